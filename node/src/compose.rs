//! `strata cluster compose up|down|logs|scale`: the life cycle of the docker-compose
//! cluster of dev-env/docker-compose.yml, which runs with TLS on. `up` copies what a
//! client on the host needs out of the `certs` service's volume (the CA, the first
//! admin's password) into `~/.strata/compose/<project>/`, logs in as admin there and
//! writes an `env` file to source; the other commands find the cluster the same way.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;
use serde_json::json;
use strata_proto::v1::cluster_client::ClusterClient;
use strata_proto::v1::NodeRequest;

use crate::cli::{connect, ClientOptions};

/// The compose project `strata cluster compose` and `chaos --compose` use by default.
pub const COMPOSE_PROJECT_DEFAULT: &str = "strata";
/// Nodes in the compose file itself; `compose scale` adds or removes nodes beyond them.
const COMPOSE_BASE_NODES: u16 = 3;
/// Most nodes `compose scale` runs.
const COMPOSE_NODES_MAX: u16 = 9;
/// How long `compose up` and `compose scale` wait for the containers to be healthy.
const COMPOSE_READY_TIMEOUT_SECS: u64 = 120;
/// The host port of node 0's gRPC, as the compose file publishes it by default.
const COMPOSE_GRPC_PORT_BASE: u16 = 7711;

#[derive(clap::Args, Debug)]
pub struct ComposeArgs {
    #[command(subcommand)]
    pub command: ComposeCommand,
    /// The compose file.
    #[arg(long, default_value = "dev-env/docker-compose.yml", global = true)]
    pub file: std::path::PathBuf,
    /// The compose project name.
    #[arg(long, env = "COMPOSE_PROJECT_NAME", default_value = COMPOSE_PROJECT_DEFAULT, global = true)]
    pub project: String,
}

#[derive(Subcommand, Debug)]
pub enum ComposeCommand {
    /// Start the cluster (the image must exist: scripts/build-image) and wait until healthy.
    Up,
    /// Stop and remove the containers and network (and the data volumes with --volumes).
    Down {
        #[arg(long)]
        volumes: bool,
    },
    /// Show the nodes' logs.
    Logs {
        #[arg(long)]
        follow: bool,
        /// Lines per node.
        #[arg(long, default_value_t = 100)]
        tail: u32,
    },
    /// Run this many nodes (3..=9): added nodes join and are promoted; removed ones leave
    /// the membership before their containers go.
    Scale { nodes: u16 },
}

/// The override file `compose scale` writes beside the compose file for nodes beyond the
/// base three.
fn scale_file(file: &std::path::Path) -> std::path::PathBuf {
    file.with_file_name("docker-compose.scale.yml")
}

fn docker_compose(args: &ComposeArgs, extra: &[&str]) -> anyhow::Result<()> {
    let mut command = std::process::Command::new("docker-compose");
    command.arg("-f").arg(&args.file);
    let scale = scale_file(&args.file);
    if scale.exists() {
        command.arg("-f").arg(&scale);
    }
    let status = command.args(["-p", &args.project]).args(extra).status().map_err(|e| anyhow::anyhow!("cannot run docker-compose: {e}"))?;
    anyhow::ensure!(status.success(), "docker-compose {} failed", extra.join(" "));
    Ok(())
}

async fn wait_healthy(project: &str, nodes: u16) -> anyhow::Result<Duration> {
    let started = std::time::Instant::now();
    let deadline = started + Duration::from_secs(COMPOSE_READY_TIMEOUT_SECS);
    loop {
        if (0..nodes).all(|node| crate::chaos::container_health(&crate::chaos::compose_container(project, u64::from(node))) == "healthy") {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "containers not healthy within {COMPOSE_READY_TIMEOUT_SECS} s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Removes node `ordinal`'s data volume (`<project>_strata-<n>-data`), if there is one.
fn remove_data_volume(project: &str, ordinal: u16) -> anyhow::Result<()> {
    let volume = format!("{project}_strata-{ordinal}-data");
    let output = std::process::Command::new("docker").args(["volume", "rm", "--force", &volume]).output().map_err(|e| anyhow::anyhow!("cannot run docker: {e}"))?;
    anyhow::ensure!(output.status.success(), "docker volume rm {volume}: {}", String::from_utf8_lossy(&output.stderr).trim());
    Ok(())
}

/// The nodes now in the compose project: the base three plus those of the scale file.
fn compose_nodes(args: &ComposeArgs) -> u16 {
    let extra = std::fs::read_to_string(scale_file(&args.file)).map_or(0, |text| text.matches("hostname: strata-").count() as u16);
    COMPOSE_BASE_NODES + extra
}

fn write_scale_file(args: &ComposeArgs, nodes: u16) -> anyhow::Result<()> {
    let path = scale_file(&args.file);
    if nodes <= COMPOSE_BASE_NODES {
        let _ = std::fs::remove_file(&path);
        return Ok(());
    }
    // Same settings as the base nodes of the compose file (TLS from the `certs` volume;
    // volumes in path order, as there).
    let mut text = String::from("# Written by `strata cluster compose scale`: the nodes beyond the base three.\nservices:\n");
    for node in COMPOSE_BASE_NODES..nodes {
        text.push_str(&format!(
            "  strata-{node}:
    image: strata:${{STRATA_VERSION:-0.1.0}}
    command: [\"serve\", \"--node-id-from-hostname\"]
    hostname: strata-{node}
    depends_on:
      certs:
        condition: service_completed_successfully
    environment:
      STRATA_SEEDS: strata-0:7791,strata-1:7791,strata-2:7791
      STRATA_CLUSTER_NAME: strata-compose
      STRATA_CLUSTER_SECRET_FILE: /certs/cluster.secret
      STRATA_ADVERTISE_HOST: strata-{node}
      STRATA_OBJECT_STORE: ${{STRATA_OBJECT_STORE:-file:///tier}}
      STRATA_TLS_CERT: /certs/node.pem
      STRATA_TLS_KEY: /certs/node.key
      STRATA_TLS_CA: /certs/ca.pem
    healthcheck:
      test: [\"CMD\", \"/usr/local/bin/strata\", \"health\"]
      interval: 2s
      timeout: 3s
      retries: 60
    volumes:
      - strata-certs:/certs:ro
      - strata-{node}-data:/data
      - strata-tier:/tier
"
        ));
    }
    text.push_str("volumes:\n");
    for node in COMPOSE_BASE_NODES..nodes {
        text.push_str(&format!("  strata-{node}-data:\n"));
    }
    std::fs::write(&path, text)?;
    Ok(())
}

/// The host port node `ordinal` (0-based) publishes its gRPC on, as the compose file
/// reads it: `STRATA_<n>_GRPC_PORT`, default 7711 + n.
fn grpc_port(ordinal: u16) -> u16 {
    std::env::var(format!("STRATA_{ordinal}_GRPC_PORT")).ok().and_then(|p| p.parse().ok()).unwrap_or(COMPOSE_GRPC_PORT_BASE + ordinal)
}

/// Where `compose up` keeps what a client on the host needs: `~/.strata/compose/<project>/`
/// (`ca.pem`, `admin.password`, `token`, `env`).
pub fn client_dir(project: &str) -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| ".".into())).join(".strata").join("compose").join(project)
}

/// Copies the CA certificate and the first admin's password out of the `certs` service's
/// container (stopped: `docker cp` reads its volume all the same) into `dir`.
fn copy_client_files(project: &str, dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    for (file, mode) in [(strata_security::certs::CA_CERT_FILE, 0o644), (crate::cli_cert::ADMIN_PASSWORD_FILE, 0o600)] {
        let target = dir.join(file);
        let _ = std::fs::remove_file(&target);
        let output = std::process::Command::new("docker")
            .args(["cp", &format!("{}:/certs/{file}", crate::chaos::service_container(project, "certs"))])
            .arg(&target)
            .output()
            .map_err(|e| anyhow::anyhow!("cannot run docker: {e}"))?;
        anyhow::ensure!(output.status.success(), "docker cp /certs/{file}: {}", String::from_utf8_lossy(&output.stderr).trim());
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// The client options for the compose cluster: its published endpoints, its CA and the
/// token `compose up` saved, unless the caller gave their own.
fn client_options(options: &ClientOptions, project: &str, nodes: u16) -> ClientOptions {
    let dir = client_dir(project);
    let mut options = options.clone();
    options.endpoints = (0..nodes).map(|node| format!("127.0.0.1:{}", grpc_port(node))).collect();
    if options.tls.ca.is_none() {
        options.tls.ca = Some(dir.join(strata_security::certs::CA_CERT_FILE));
    }
    if options.auth.token.is_none() && options.auth.token_file.is_none() {
        options.auth.token_file = Some(dir.join("token"));
    }
    options
}

/// Writes `<dir>/env`: the variables that point every `strata` command at this cluster.
fn write_env_file(dir: &Path, options: &ClientOptions) -> anyhow::Result<PathBuf> {
    let path = dir.join("env");
    let ca = options.tls.ca.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    let token = options.auth.token_path();
    std::fs::write(
        &path,
        format!(
            "# Written by `strata cluster compose up`: `source` it to talk to this compose cluster.\n\
             export STRATA_ENDPOINTS={}\nexport STRATA_TLS_CA={ca}\nexport STRATA_TOKEN_FILE={}\n",
            options.endpoints.join(","),
            token.display()
        ),
    )?;
    Ok(path)
}

pub async fn compose(args: ComposeArgs, options: &ClientOptions) -> anyhow::Result<()> {
    let json = options.json;
    match &args.command {
        ComposeCommand::Up => {
            docker_compose(&args, &["up", "-d"])?;
            let nodes = compose_nodes(&args);
            let took = wait_healthy(&args.project, nodes).await?;
            let dir = client_dir(&args.project);
            copy_client_files(&args.project, &dir)?;
            let client = client_options(options, &args.project, nodes);
            let password_file = dir.join(crate::cli_cert::ADMIN_PASSWORD_FILE);
            crate::cli_user::login_to_token_file(&client, "admin", Some(&password_file)).await.map_err(|e| anyhow::anyhow!("logging in as admin: {e}"))?;
            let env = write_env_file(&dir, &client)?;
            if json {
                println!("{}", json!({"project": args.project, "nodes": nodes, "ready_secs": took.as_secs_f64(), "env_file": env, "admin_password_file": password_file}));
            } else {
                println!("compose cluster {} ready: {nodes} nodes healthy in {:.1} s, TLS on", args.project, took.as_secs_f64());
                println!("logged in as admin (password in {}); to talk to it:", password_file.display());
                println!("  source {} && strata cluster status", env.display());
            }
        }
        ComposeCommand::Down { volumes } => {
            docker_compose(&args, if *volumes { &["down", "--volumes"] } else { &["down"] })?;
            if json {
                println!("{}", json!({"project": args.project, "down": true, "volumes_removed": volumes}));
            }
        }
        ComposeCommand::Logs { follow, tail } => {
            let tail = format!("--tail={tail}");
            let mut extra = vec!["logs", "--no-color", tail.as_str()];
            if *follow {
                extra.push("--follow");
            }
            docker_compose(&args, &extra)?;
        }
        ComposeCommand::Scale { nodes } => {
            let nodes = *nodes;
            anyhow::ensure!((COMPOSE_BASE_NODES..=COMPOSE_NODES_MAX).contains(&nodes), "nodes must be {COMPOSE_BASE_NODES}..={COMPOSE_NODES_MAX}");
            let current = compose_nodes(&args);
            if nodes < current {
                // Leave the membership first, then stop: a voter must not just vanish.
                let mut client = ClusterClient::new(connect(&client_options(options, &args.project, current)).await.map_err(|e| anyhow::anyhow!("{e}"))?);
                for node in (nodes..current).rev() {
                    match client.remove(NodeRequest { node_id: u64::from(node) + 1 }).await {
                        Ok(_) => println!("node {} removed from the membership", node + 1),
                        Err(status) if status.code() == tonic::Code::NotFound => {}
                        Err(status) => anyhow::bail!("removing node {}: {}", node + 1, status.message()),
                    }
                    docker_compose(&args, &["rm", "--stop", "--force", &crate::chaos::compose_service(u64::from(node))])?;
                    // Its data is a removed member's: a later scale-up must start it empty,
                    // to join as a new learner, not to wait for a membership it left.
                    remove_data_volume(&args.project, node)?;
                }
            }
            write_scale_file(&args, nodes)?;
            docker_compose(&args, &["up", "-d", "--remove-orphans"])?;
            let took = wait_healthy(&args.project, nodes).await?;
            if json {
                println!("{}", json!({"project": args.project, "nodes": nodes, "ready_secs": took.as_secs_f64()}));
            } else {
                println!("compose cluster {} runs {nodes} nodes ({:.1} s to healthy)", args.project, took.as_secs_f64());
            }
        }
    }
    Ok(())
}
