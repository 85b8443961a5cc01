//! `strata snapshot save|load|list|delete`: aggregate snapshots from the command line.

use clap::Subcommand;
use serde_json::json;
use strata_proto::v1::snapshots_client::SnapshotsClient;
use strata_proto::v1::{DeleteSnapshotRequest, ListSnapshotsRequest, LoadSnapshotRequest, SaveSnapshotRequest, StoredSnapshot};

use crate::cli::{connect, content_type_for, format_unix_ms, read_data_argument, ClientOptions, CliError};

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Save an aggregate's state at a stream version (the version must be committed).
    Save {
        stream: String,
        #[arg(long)]
        version: u64,
        /// The state: JSON text, @file, or - for stdin.
        #[arg(long)]
        data: String,
        /// Default: application/json when the state parses as JSON.
        #[arg(long)]
        content_type: Option<String>,
    },
    /// Print the latest snapshot (or the latest at or below --max-version).
    Load {
        stream: String,
        #[arg(long)]
        max_version: Option<u64>,
    },
    /// List a stream's snapshots.
    List { stream: String },
    /// Delete one version, or every snapshot of the stream.
    Delete {
        stream: String,
        #[arg(long)]
        version: Option<u64>,
    },
}

fn snapshot_json(snapshot: &StoredSnapshot) -> serde_json::Value {
    let state = match serde_json::from_slice::<serde_json::Value>(&snapshot.state) {
        Ok(value) if snapshot.content_type == "application/json" => value,
        _ => json!(String::from_utf8_lossy(&snapshot.state)),
    };
    json!({
        "stream": snapshot.stream, "version": snapshot.version, "content_type": snapshot.content_type,
        "created": format_unix_ms(snapshot.created_unix_ms), "state_bytes": snapshot.state_bytes, "state": state,
    })
}

pub async fn snapshot(options: &ClientOptions, command: SnapshotCommand) -> Result<(), CliError> {
    let mut client = SnapshotsClient::new(connect(options).await?).max_decoding_message_size(64 * 1024 * 1024);
    match command {
        SnapshotCommand::Save { stream, version, data, content_type } => {
            let state = read_data_argument(&data)?;
            let content_type = content_type_for(&state, &content_type);
            let saved = client.save(SaveSnapshotRequest { stream, version, state, content_type }).await?.into_inner();
            if options.json {
                println!("{}", json!({"stream": saved.stream, "version": saved.version, "commit_token": saved.commit_token}));
            } else {
                println!("saved snapshot of {} at version {}", saved.stream, saved.version);
            }
        }
        SnapshotCommand::Load { stream, max_version } => {
            let loaded = client.load(LoadSnapshotRequest { stream, max_version }).await?.into_inner();
            let snapshot = loaded.snapshot.unwrap_or_default();
            if options.json {
                println!("{}", snapshot_json(&snapshot));
            } else {
                println!("{} @ {} ({}, {} bytes)", snapshot.stream, snapshot.version, snapshot.content_type, snapshot.state_bytes);
                println!("{}", String::from_utf8_lossy(&snapshot.state));
            }
        }
        SnapshotCommand::List { stream } => {
            let listed = client.list(ListSnapshotsRequest { stream }).await?.into_inner();
            if options.json {
                // List answers carry no state: the same object as `load`, without it.
                let all: Vec<_> = listed
                    .snapshots
                    .iter()
                    .map(|s| {
                        let mut line = snapshot_json(s);
                        line.as_object_mut().expect("an object").remove("state");
                        line
                    })
                    .collect();
                println!("{}", json!(all));
            } else {
                println!("{:>10}  {:>10}  {:<24}  created", "version", "bytes", "content type");
                for s in &listed.snapshots {
                    println!("{:>10}  {:>10}  {:<24}  {}", s.version, s.state_bytes, s.content_type, format_unix_ms(s.created_unix_ms));
                }
            }
        }
        SnapshotCommand::Delete { stream, version } => {
            let deleted = client.delete(DeleteSnapshotRequest { stream, version }).await?.into_inner().deleted;
            if options.json {
                println!("{}", json!({"deleted": deleted}));
            } else {
                println!("deleted {deleted} snapshot(s)");
            }
        }
    }
    Ok(())
}
