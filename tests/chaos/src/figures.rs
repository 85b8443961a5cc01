//! The figures a run reports beside its anomalies: operations by kind and outcome, faults
//! by kind, leader-loss recovery times and the windows in which no append was
//! acknowledged.

use std::collections::BTreeMap;

use crate::history::{AppendOutcome, Consistency, FaultRecord, Op, OpKind, ReadOutcome};

/// A pause between two consecutive acknowledgements longer than this is an unavailable window.
pub const UNAVAILABLE_GAP_MS: u64 = 1_000;

#[derive(Debug, Default)]
pub struct Figures {
    pub operations: BTreeMap<String, u64>,
    pub faults: BTreeMap<String, u64>,
    /// Per leader-loss fault: from its start to the first acknowledgement of an append
    /// invoked after it started (`None`: none in the run).
    pub recovery_ms: Vec<Option<u64>>,
    /// (start, length) of every gap between acknowledgements over [`UNAVAILABLE_GAP_MS`].
    pub unavailable: Vec<(u64, u64)>,
}

impl Figures {
    pub fn of(ops: &[Op], faults: &[FaultRecord]) -> Self {
        let mut figures = Figures::default();
        for op in ops {
            *figures.operations.entry(op_label(&op.kind)).or_insert(0) += 1;
        }
        for fault in faults {
            *figures.faults.entry(fault.kind.clone()).or_insert(0) += 1;
        }
        let mut acks: Vec<(u64, u64)> = ops
            .iter()
            .filter(|op| matches!(op.kind, OpKind::Append { outcome: AppendOutcome::Ok { .. }, .. }))
            .map(|op| (op.invoke_ms, op.complete_ms))
            .collect();
        for fault in faults.iter().filter(|f| f.leader_loss) {
            let first = acks.iter().filter(|(invoke, _)| *invoke >= fault.start_ms).map(|(_, complete)| *complete).min();
            figures.recovery_ms.push(first.map(|at| at - fault.start_ms));
        }
        acks.sort_by_key(|(_, complete)| *complete);
        for pair in acks.windows(2) {
            let gap = pair[1].1 - pair[0].1;
            if gap > UNAVAILABLE_GAP_MS {
                figures.unavailable.push((pair[0].1, gap));
            }
        }
        figures
    }

    /// (p50, p99, max) of the recoveries that happened, and how many did not.
    pub fn recovery_summary(&self) -> Option<(u64, u64, u64, usize)> {
        let mut done: Vec<u64> = self.recovery_ms.iter().flatten().copied().collect();
        if done.is_empty() {
            return None;
        }
        done.sort_unstable();
        let at = |q: f64| done[((done.len() as f64 - 1.0) * q).round() as usize];
        Some((at(0.5), at(0.99), *done.last().unwrap(), self.recovery_ms.len() - done.len()))
    }
}

fn op_label(kind: &OpKind) -> String {
    match kind {
        OpKind::Append { outcome, .. } => {
            let outcome = match outcome {
                AppendOutcome::Ok { replay: false, .. } => "ok",
                AppendOutcome::Ok { replay: true, .. } => "ok (replay)",
                AppendOutcome::WrongVersion { .. } => "wrong_expected_version",
                AppendOutcome::Refused { .. } => "refused",
                AppendOutcome::Indeterminate { .. } => "indeterminate",
            };
            format!("append {outcome}")
        }
        OpKind::ReadStream { consistency, outcome, .. } => {
            let level = match consistency {
                Consistency::Linearizable => "linearizable",
                Consistency::Local => "local",
                Consistency::Session(_) => "session",
            };
            let outcome = match outcome {
                ReadOutcome::Ok { .. } | ReadOutcome::NotFound => "ok",
                ReadOutcome::Failed { .. } => "failed",
            };
            format!("read {level} {outcome}")
        }
        OpKind::SubscriptionEpoch { ended, .. } => {
            format!("subscription epoch {}", if ended == "stopped" { "completed" } else { "dropped" })
        }
        OpKind::GroupEpoch { ended, drain, .. } => {
            let how = if ended == "stopped" || ended == "drained" { "completed" } else { "dropped" };
            format!("group {} {how}", if *drain { "drain" } else { "connection" })
        }
    }
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "operations by kind and outcome:")?;
        for (label, count) in &self.operations {
            writeln!(f, "  {label}: {count}")?;
        }
        writeln!(f, "faults by kind:")?;
        for (kind, count) in &self.faults {
            writeln!(f, "  {kind}: {count}")?;
        }
        match self.recovery_summary() {
            Some((p50, p99, max, never)) => writeln!(
                f,
                "leader-loss recovery: {} faults, p50 {p50} ms, p99 {p99} ms, max {max} ms{}",
                self.recovery_ms.len(),
                if never > 0 { format!(", {never} without an acknowledgement afterwards") } else { String::new() }
            )?,
            None => writeln!(f, "leader-loss recovery: no leader-loss fault")?,
        }
        let total: u64 = self.unavailable.iter().map(|(_, len)| len).sum();
        writeln!(f, "unavailable windows (no ack for > {UNAVAILABLE_GAP_MS} ms): {}, {total} ms in all", self.unavailable.len())?;
        for (start, len) in &self.unavailable {
            writeln!(f, "  at {start} ms for {len} ms")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(id: u64, invoke_ms: u64, complete_ms: u64) -> Op {
        Op {
            id,
            client: 0,
            node: 1,
            invoke_ms,
            complete_ms,
            kind: OpKind::Append {
                stream: "s".into(),
                expected: crate::history::Expected::Any,
                event_ids: vec![format!("e{id}")],
                outcome: AppendOutcome::Ok { first_version: id, first_position: id, commit_token: id, replay: false },
            },
        }
    }

    #[test]
    fn recovery_is_measured_from_the_fault_to_the_first_ack_invoked_after_it() {
        let ops = vec![ack(0, 0, 500), ack(1, 900, 1_100), ack(2, 1_200, 3_500), ack(3, 3_600, 3_700)];
        let fault = FaultRecord { kind: "kill_leader".into(), detail: String::new(), leader_loss: true, start_ms: 1_000, end_ms: 2_000 };
        let figures = Figures::of(&ops, &[fault]);
        // op 1 was invoked before the fault: it does not count as recovery.
        assert_eq!(figures.recovery_ms, vec![Some(2_500)]);
        assert_eq!(figures.unavailable, vec![(1_100, 2_400)]);
        assert_eq!(figures.operations["append ok"], 4);
        assert_eq!(figures.recovery_summary(), Some((2_500, 2_500, 2_500, 0)));
    }
}
