//! What a chaos run records. One [`Op`] per client operation, written as one JSON line
//! when it completes; the final state is every node's full `$all` after healing.

use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};

/// The expected-version mode of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Expected {
    Any,
    NoStream,
    StreamExists,
    Exact(u64),
}

/// How an append ended for the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppendOutcome {
    /// Acknowledged: the events are at these versions and positions, covered by this
    /// commit token. A replay answers with the original result.
    Ok { first_version: u64, first_position: u64, commit_token: u64, replay: bool },
    /// Definitely not written: wrong expected version.
    WrongVersion { actual: Option<u64> },
    /// Definitely not written, for another reason (bad input, no leader before proposing).
    Refused { reason: String },
    /// May or may not be written (timeout, connection lost after proposing).
    Indeterminate { reason: String },
}

/// A read's consistency level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    Linearizable,
    Local,
    /// Session read with the client's last commit token.
    Session(u64),
}

/// What a stream read returned: event ids in version order, from version 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadOutcome {
    Ok { event_ids: Vec<String> },
    NotFound,
    Failed { reason: String },
}

/// One event a subscription delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivered {
    pub id: String,
    pub position: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum OpKind {
    Append { stream: String, expected: Expected, event_ids: Vec<String>, outcome: AppendOutcome },
    ReadStream { stream: String, consistency: Consistency, outcome: ReadOutcome },
    /// One epoch of a catch-up subscription to `$all`: subscribed after position
    /// `after` (`None`: from the start), delivered `delivered` in order, and ended
    /// (dropped, failed or stopped) with `checkpoint` stored: the position the next epoch
    /// of subscription `subscription` resubscribes after.
    SubscriptionEpoch { subscription: u32, epoch: u32, after: Option<u64>, delivered: Vec<Delivered>, checkpoint: Option<u64>, ended: String },
    /// One connection of a consumer of the run's persistent group: the group's replicated
    /// checkpoint observed (through `Info`) before connecting, every delivery in order with
    /// what the consumer answered, and how the connection ended. `drain` marks the final
    /// consumer that acks everything left after healing.
    GroupEpoch { consumer: u32, epoch: u32, checkpoint_before: Option<u64>, deliveries: Vec<GroupDelivery>, ended: String, drain: bool },
}

/// What a group consumer answered to a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupAnswer {
    Ack,
    /// Nack with retry.
    Retry,
}

/// One delivery of the persistent group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupDelivery {
    pub id: String,
    pub stream: String,
    pub version: u64,
    pub position: u64,
    pub retry_count: u32,
    pub answer: GroupAnswer,
}

/// One injected fault, logged with its start and end (milliseconds since the run started).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRecord {
    /// The fault's kind (`kill_leader`, `pause_leader`, `partition_isolate_leader`, ...).
    pub kind: String,
    /// What exactly was done, for the timeline.
    pub detail: String,
    /// Whether the fault removed the leader (its recovery time counts as leader loss).
    pub leader_loss: bool,
    pub start_ms: u64,
    pub end_ms: u64,
}

/// One client operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// Unique in the run.
    pub id: u64,
    pub client: u32,
    /// The node the client called.
    pub node: u64,
    /// Milliseconds since the run started.
    pub invoke_ms: u64,
    pub complete_ms: u64,
    #[serde(flatten)]
    pub kind: OpKind,
}

/// One event of a node's final `$all`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalEvent {
    pub id: String,
    pub stream: String,
    pub version: u64,
    pub position: u64,
}

impl From<strata_proto::v1::RecordedEvent> for FinalEvent {
    fn from(e: strata_proto::v1::RecordedEvent) -> Self {
        FinalEvent { id: e.id, stream: e.stream, version: e.version, position: e.position }
    }
}

/// Appends `record` (an [`Op`] or a [`FaultRecord`]) to a JSONL file.
pub fn write_jsonl<T: Serialize>(out: &mut impl Write, record: &T) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, record)?;
    out.write_all(b"\n")
}

/// Reads a JSONL history (or fault timeline); a malformed line is an error naming its number.
pub fn read_jsonl<T: serde::de::DeserializeOwned>(input: impl BufRead) -> Result<Vec<T>, String> {
    let mut ops = Vec::new();
    for (number, line) in input.lines().enumerate() {
        let line = line.map_err(|e| format!("history line {}: {e}", number + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        ops.push(serde_json::from_str(&line).map_err(|e| format!("history line {}: {e}", number + 1))?);
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_round_trip_through_jsonl() {
        let op = Op {
            id: 7,
            client: 1,
            node: 2,
            invoke_ms: 10,
            complete_ms: 12,
            kind: OpKind::Append {
                stream: "s".into(),
                expected: Expected::Exact(3),
                event_ids: vec!["a".into()],
                outcome: AppendOutcome::Ok { first_version: 4, first_position: 9, commit_token: 11, replay: false },
            },
        };
        let mut buffer = Vec::new();
        write_jsonl(&mut buffer, &op).unwrap();
        write_jsonl(&mut buffer, &op).unwrap();
        assert_eq!(read_jsonl::<Op>(&buffer[..]).unwrap(), vec![op.clone(), op]);
        assert!(read_jsonl::<Op>(&b"{not json}\n"[..]).unwrap_err().contains("line 1"));
    }
}
