//! The `strata` binary: server, local dev cluster, client commands, benchmark.

use clap::{Parser, Subcommand};
use strata_node::bench::BenchArgs;
use strata_node::cli::{
    self, AppendArgs, ClientOptions, DeleteArgs, ReadAllArgs, ReadArgs, RetentionArgs, StreamInfoArgs, StreamsArgs, SubscribeArgs,
};
use strata_node::manager::{self, ClusterCommand};
use strata_node::config::NodeConfig;
use strata_node::dev::DevArgs;
use tracing_subscriber::EnvFilter;

/// mimalloc, not glibc's malloc: under load the nodes allocate and free many short-lived
/// buffers across threads (request bodies, Raft entries, sled nodes); with glibc's
/// allocator about a quarter of all server CPU went to `_int_malloc`, `_int_free` and
/// `malloc_consolidate` (perf, 64 writers x 10 events).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay`: its index in `mi_option_e` of mimalloc.h (v2), for
/// which the sys crate names no constant.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// How long freed memory stays committed before mimalloc gives it back to the OS. With the
/// default 10 ms a node gave memory back between the bursts of a steady load and faulted it
/// in again, the kernel zeroing each (huge) page anew: `clear_page_erms` was 4-6 % of a
/// leader's CPU at 64 writers x 10 events, and of a `$all` read-back. With a second, the
/// same load ran at 35-37 µs of server CPU per event against 39-40 (two A/B pairs, the env
/// knob `MIMALLOC_PURGE_DELAY`); memory still goes back a second after a load ends.
const ALLOCATOR_PURGE_DELAY_MS: std::os::raw::c_long = 1000;

/// Sets the allocator's options. Runs first in `main`: mimalloc's options API is not
/// thread-safe, so no other thread may exist yet.
fn tune_allocator() {
    // An operator's `MIMALLOC_PURGE_DELAY` still wins: it is how the value was measured.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: called before any thread is spawned (see above); the option index is
        // mimalloc v2's, the version the workspace pins.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, ALLOCATOR_PURGE_DELAY_MS) };
    }
}

#[derive(Parser)]
#[command(name = "strata", version, about = "Strata: a Raft-replicated event store")]
struct Cli {
    #[command(flatten)]
    client: ClientOptions,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Serve(Box<NodeConfig>),
    /// Run a local cluster of N nodes on 127.0.0.1 until Ctrl-C.
    Dev(DevArgs),
    /// Append events to a stream.
    Append(AppendArgs),
    /// Read a stream.
    Read(ReadArgs),
    /// Read $all, the global order.
    ReadAll(ReadAllArgs),
    /// Follow a stream or $all: history, then live (Ctrl-C stops).
    Subscribe(SubscribeArgs),
    /// List streams.
    Streams(StreamsArgs),
    /// Show a stream's head, count, timestamps, tier and retention.
    StreamInfo(StreamInfoArgs),
    /// Delete a stream: soft (appends continue its versions) or --hard (a tombstone).
    Delete(DeleteArgs),
    /// Set a stream's retention: --max-age and --max-count (omitted: no limit).
    Retention(RetentionArgs),
    /// Persistent subscription groups: create, update, delete, info, list, connect, replay-parked.
    #[command(subcommand)]
    Group(strata_node::cli_group::GroupCommand),
    /// Aggregate snapshots: save, load, list, delete.
    #[command(subcommand)]
    Snapshot(strata_node::cli_snapshot::SnapshotCommand),
    /// Cluster manager.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Log in: get a token for a user and save it for the other commands.
    Login(strata_node::cli_user::LoginArgs),
    /// Show who the node takes you for.
    Whoami,
    /// Users (admin only): add, list, remove.
    #[command(subcommand)]
    User(strata_node::cli_user::UserCommand),
    /// Per-stream read and write rules (admin only): set, list, remove.
    #[command(subcommand)]
    Acl(strata_node::cli_user::AclCommand),
    /// Benchmark the append/read workload of the peer harness against any endpoints.
    Bench(BenchArgs),
    /// Create a cluster CA and node certificates (TLS): ca, node, dev.
    #[command(subcommand)]
    Cert(strata_node::cli_cert::CertCommand),
    /// Check a node's HTTP health endpoint (exit 0 when healthy): the health check of
    /// images that have no shell or curl.
    Health(HealthArgs),
}

#[derive(clap::Args)]
struct HealthArgs {
    /// The node's HTTP address.
    #[arg(long, env = "STRATA_HTTP_ADDR", default_value = "127.0.0.1:7781")]
    http_addr: String,
    /// Check liveness (/health/live) instead of readiness (/health/ready).
    #[arg(long)]
    live: bool,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 3)]
    timeout_secs: u64,
}

fn init_tracing(json: bool, default_level: &str) {
    let filter = EnvFilter::try_from_env("STRATA_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() {
    tune_allocator();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    // Once for the process: rustls users without a provider of their own take this one.
    strata_security::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime starts");
    let options = cli.client.clone();
    let result: Result<(), cli::CliError> = runtime.block_on(async move {
        match cli.command {
            Command::Serve(config) => {
                init_tracing(config.log_format == "json", "info,openraft=warn,sled=warn");
                strata_node::server::serve(*config).await.map_err(|e| cli::CliError::Usage(format!("{e:#}")))
            }
            Command::Dev(args) => strata_node::dev::run(args).await.map_err(|e| cli::CliError::Usage(format!("{e:#}"))),
            Command::Bench(args) => {
                let tls = options.tls.client_tls()?;
                let token = options.auth.bearer()?;
                strata_node::bench::run(args, tls, token).await.map_err(|e| cli::CliError::Usage(format!("{e:#}")))
            }
            Command::Cert(command) => strata_node::cli_cert::cert(command),
            Command::Health(args) => {
                // A listen address of 0.0.0.0 (containers) is checked on loopback.
                let addr = args.http_addr.replace("0.0.0.0", "127.0.0.1");
                let path = if args.live { "/health/live" } else { "/health/ready" };
                match strata_node::http::check_health(&addr, path, std::time::Duration::from_secs(args.timeout_secs)).await {
                    Ok(body) => {
                        println!("{body}");
                        Ok(())
                    }
                    Err(reason) => Err(cli::CliError::Usage(format!("unhealthy: {reason}"))),
                }
            }
            command => {
                init_tracing(false, "warn");
                match command {
                    Command::Append(args) => cli::append(&options, args).await,
                    Command::Read(args) => cli::read(&options, args).await,
                    Command::ReadAll(args) => cli::read_all(&options, args).await,
                    Command::Subscribe(args) => cli::subscribe(&options, args).await,
                    Command::Streams(args) => cli::streams(&options, args).await,
                    Command::StreamInfo(args) => cli::stream_info(&options, args).await,
                    Command::Delete(args) => cli::delete(&options, args).await,
                    Command::Retention(args) => cli::retention(&options, args).await,
                    Command::Group(command) => strata_node::cli_group::group(&options, command).await,
                    Command::Snapshot(command) => strata_node::cli_snapshot::snapshot(&options, command).await,
                    Command::Cluster(command) => manager::cluster(&options, command).await,
                    Command::Login(args) => strata_node::cli_user::login(&options, args).await,
                    Command::Whoami => strata_node::cli_user::whoami(&options).await,
                    Command::User(command) => strata_node::cli_user::user(&options, command).await,
                    Command::Acl(command) => strata_node::cli_user::acl(&options, command).await,
                    Command::Serve(_) | Command::Dev(_) | Command::Bench(_) | Command::Cert(_) | Command::Health(_) => unreachable!("handled above"),
                }
            }
        }
    });
    if let Err(e) = result {
        match (cli.client.json, e.to_json()) {
            (true, Some(json)) => println!("{json}"),
            _ => eprintln!("strata: {e}"),
        }
        std::process::exit(e.exit_code());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_index_is_mimallocs() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // Its documented default is 10 ms; its neighbours (eager commit delay, NUMA nodes)
        // default to 1 and 0, so an index off by one is caught.
        // SAFETY: reads an option; nothing in this test process sets options concurrently.
        let (before, at, after) = unsafe {
            (
                libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY - 1),
                libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY),
                libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY + 1),
            )
        };
        assert_eq!((before, at, after), (1, 10, 0));
    }
}
