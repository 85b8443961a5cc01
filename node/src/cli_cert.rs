//! `strata cert`: a cluster CA and node certificates, for development, compose and
//! Kubernetes set-ups (production clusters may bring their own CA).

use std::net::IpAddr;
use std::path::PathBuf;

use clap::Subcommand;
use strata_security::certs::{self, LeafSpec};

use crate::cli::CliError;

#[derive(Subcommand, Debug)]
pub enum CertCommand {
    /// Create a CA: `<out>/ca.pem` and `<out>/ca.key` (never overwritten).
    Ca {
        #[arg(long)]
        out: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "Strata cluster CA")]
        name: String,
    },
    /// Create a node certificate signed by the CA: `<out>/<name>.pem` and `<out>/<name>.key`.
    /// It carries the reserved node name, `localhost` and 127.0.0.1, plus `--dns` and `--ip`.
    Node {
        /// Directory holding `ca.pem` and `ca.key`.
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// File stem of the certificate and key.
        #[arg(long, default_value = "node")]
        name: String,
        /// More DNS names clients may reach the node at (comma-separated).
        #[arg(long, value_delimiter = ',')]
        dns: Vec<String>,
        /// More IP addresses clients may reach the node at (comma-separated).
        #[arg(long, value_delimiter = ',')]
        ip: Vec<IpAddr>,
        /// The reserved node name (as `strata serve --tls-node-name`).
        #[arg(long, default_value = strata_security::NODE_NAME_DEFAULT)]
        node_name: String,
        #[arg(long, default_value_t = certs::NODE_VALID_DAYS_DEFAULT)]
        days: i64,
    },
    /// A CA and one node certificate in `<out>` (`ca.*`, `node.*`), for a local or
    /// compose cluster: what `strata serve --tls-cert <out>/node.pem --tls-key <out>/node.key
    /// --tls-ca <out>/ca.pem` and `strata --ca <out>/ca.pem ...` take.
    Dev {
        #[arg(long)]
        out: PathBuf,
        /// More DNS names of the nodes (comma-separated), e.g. compose service names.
        #[arg(long, value_delimiter = ',')]
        dns: Vec<String>,
        /// Also write a random first-admin password to `<out>/admin.password` (owner-only),
        /// for `strata serve --admin-password-file`.
        #[arg(long)]
        admin_password: bool,
        /// Also write a random gossip secret to `<out>/cluster.secret` (owner-only), for
        /// `strata serve --cluster-secret-file`.
        #[arg(long)]
        cluster_secret: bool,
        /// Succeed without touching anything when `<out>` already holds the set (the
        /// compose file's one-shot `certs` service runs on every `up`).
        #[arg(long)]
        if_missing: bool,
    },
}

/// The file `strata cert dev --admin-password` writes the first admin's password to.
pub const ADMIN_PASSWORD_FILE: &str = "admin.password";
/// The file `strata cert dev --cluster-secret` writes the gossip secret to.
pub const CLUSTER_SECRET_FILE: &str = "cluster.secret";

pub fn cert(command: CertCommand) -> Result<(), CliError> {
    let failed = |e: strata_security::TlsError| CliError::Usage(e.to_string());
    match command {
        CertCommand::Ca { out, name } => {
            let path = certs::create_ca(&out, &name).map_err(failed)?;
            println!("CA certificate {} (key beside it, readable by you only: keep it off the nodes)", path.display());
        }
        CertCommand::Node { ca_dir, out, name, dns, ip, node_name, days } => {
            let path = certs::create_leaf(&ca_dir, &out, &LeafSpec::node(&name, &node_name, &dns, &ip, days)).map_err(failed)?;
            println!("node certificate {} (key {})", path.display(), path.with_extension("key").display());
        }
        CertCommand::Dev { out, dns, admin_password, cluster_secret, if_missing } => {
            let password_path = out.join(ADMIN_PASSWORD_FILE);
            let secret_path = out.join(CLUSTER_SECRET_FILE);
            let complete = [certs::CA_CERT_FILE, "node.pem", "node.key"].iter().all(|file| out.join(file).exists())
                && (!admin_password || password_path.exists())
                && (!cluster_secret || secret_path.exists());
            if if_missing && complete {
                println!("{} already holds the CA, the node certificate and the secrets asked for: kept", out.display());
                return Ok(());
            }
            let ca = certs::create_ca(&out, "Strata dev CA").map_err(failed)?;
            let node = certs::create_leaf(
                &out,
                &out,
                &LeafSpec::node("node", strata_security::NODE_NAME_DEFAULT, &dns, &[], certs::NODE_VALID_DAYS_DEFAULT),
            )
            .map_err(failed)?;
            println!("CA {} and node certificate {} (one for every node)", ca.display(), node.display());
            println!(
                "serve with: --tls-cert {} --tls-key {} --tls-ca {}",
                node.display(),
                node.with_extension("key").display(),
                ca.display()
            );
            println!("clients:    strata --ca {} ...", ca.display());
            if admin_password {
                let path = certs::create_secret_file(&password_path).map_err(failed)?;
                println!("first admin: --admin-password-file {} (then: strata login --user admin --password-file {})", path.display(), path.display());
            }
            if cluster_secret {
                let path = certs::create_secret_file(&secret_path).map_err(failed)?;
                println!("gossip:      --cluster-secret-file {}", path.display());
            }
        }
    }
    Ok(())
}
