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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum OpKind {
    Append { stream: String, expected: Expected, event_ids: Vec<String>, outcome: AppendOutcome },
    ReadStream { stream: String, consistency: Consistency, outcome: ReadOutcome },
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

/// Appends `op` to a JSONL history.
pub fn write_op(out: &mut impl Write, op: &Op) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, op)?;
    out.write_all(b"\n")
}

/// Reads a JSONL history; a malformed line is an error naming its number.
pub fn read_ops(input: impl BufRead) -> Result<Vec<Op>, String> {
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
        write_op(&mut buffer, &op).unwrap();
        write_op(&mut buffer, &op).unwrap();
        assert_eq!(read_ops(&buffer[..]).unwrap(), vec![op.clone(), op]);
        assert!(read_ops(&b"{not json}\n"[..]).unwrap_err().contains("line 1"));
    }
}
