//! The invariants of SPEC §3, checked over a recorded history and every node's final
//! `$all` (read after healing and draining).
//!
//! - `divergent_all`: a node's `$all` differs from the first node's;
//! - `position_gap`: `$all` positions are not exactly 0..n;
//! - `version_gap`: a stream's versions are not 0..k in position order;
//! - `duplicate`: an event id appears more than once;
//! - `phantom`: an event no client ever tried to append;
//! - `lost`: an acknowledged event is missing; `moved`: present, but not at the version and
//!   position it was acknowledged with;
//! - `double_occ_success`: two different appends succeeded with the same exact expected
//!   version on one stream;
//! - `stale_read`: a linearizable read missed an append acknowledged before it started;
//! - `session_behind`: a session read missed an append covered by its token;
//! - `read_not_prefix`: a read returned events that are not the stream's final prefix;
//! - `subscription_gap` / `subscription_duplicate`: an epoch of a subscription skipped a
//!   position of `$all`, or went back to one (a repeat or a reordering);
//! - `subscription_wrong_event`: it delivered at a position an event `$all` does not hold
//!   there;
//! - `dishonest_checkpoint`: an epoch stored a checkpoint past what it delivered, or the
//!   next epoch did not resubscribe after the stored checkpoint;
//! - `group_wrong_event`: the persistent group delivered an event `$all` does not hold at
//!   that position;
//! - `group_below_checkpoint`: it delivered an event below a checkpoint observed before
//!   the connection (everything below the replicated checkpoint is settled: never again);
//! - `group_unordered`: within one connection of the pinned group, a stream's versions
//!   went back (a retry repeats a version, it never skips back past one);
//! - `group_not_acked`: after draining, an event of `$all` was never acked (at-least-once);
//! - `group_not_drained`: the draining consumer did not see the group settle.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::history::{AppendOutcome, Consistency, Delivered, Expected, FinalEvent, GroupAnswer, Op, OpKind, ReadOutcome};

/// Examples kept per anomaly kind.
pub const EXAMPLES_PER_KIND_MAX: usize = 5;

/// Anomalies by kind, with the first examples of each.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub counts: BTreeMap<&'static str, u64>,
    pub examples: BTreeMap<&'static str, Vec<String>>,
    pub acknowledged_events: u64,
    pub operations: u64,
    /// Persistent-group deliveries, and those of an event that was acked before.
    pub group_deliveries: u64,
    pub group_redeliveries_after_ack: u64,
}

impl Report {
    fn flag(&mut self, kind: &'static str, example: String) {
        *self.counts.entry(kind).or_insert(0) += 1;
        let examples = self.examples.entry(kind).or_default();
        if examples.len() < EXAMPLES_PER_KIND_MAX {
            examples.push(example);
        }
    }

    /// Total anomalies (0 for a correct run).
    pub fn anomalies(&self) -> u64 {
        self.counts.values().sum()
    }

    pub fn count(&self, kind: &str) -> u64 {
        self.counts.get(kind).copied().unwrap_or(0)
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "operations {}, acknowledged events {}, anomalies {}", self.operations, self.acknowledged_events, self.anomalies())?;
        if self.group_deliveries > 0 {
            writeln!(f, "group deliveries {}, redelivered after an ack {}", self.group_deliveries, self.group_redeliveries_after_ack)?;
        }
        for (kind, count) in &self.counts {
            writeln!(f, "  {kind}: {count}")?;
            for example in &self.examples[kind] {
                writeln!(f, "    e.g. {example}")?;
            }
        }
        Ok(())
    }
}

/// Checks `ops` against the final `$all` of every node (`finals[node]`).
pub fn check(ops: &[Op], finals: &BTreeMap<u64, Vec<FinalEvent>>) -> Report {
    let mut report = Report { operations: ops.len() as u64, ..Default::default() };
    let Some((&reference_node, reference)) = finals.iter().next() else {
        report.flag("divergent_all", "no node's $all was read".into());
        return report;
    };
    for (node, events) in finals {
        if events != reference {
            let at = events.iter().zip(reference).position(|(a, b)| a != b).unwrap_or(events.len().min(reference.len()));
            report.flag(
                "divergent_all",
                format!("node {node} differs from node {reference_node} at index {at} ({} vs {} events)", events.len(), reference.len()),
            );
        }
    }
    check_shape(reference, &mut report);
    let by_id: HashMap<&str, &FinalEvent> = reference.iter().map(|e| (e.id.as_str(), e)).collect();
    let streams = stream_orders(reference);
    check_appends(ops, &by_id, &mut report);
    check_reads(ops, &streams, &mut report);
    check_subscriptions(ops, reference, &mut report);
    check_group(ops, reference, &mut report);
    report
}

/// The persistent group's invariants (see the module comment).
fn check_group(ops: &[Op], all: &[FinalEvent], report: &mut Report) {
    let mut epochs: Vec<&Op> = ops.iter().filter(|op| matches!(op.kind, OpKind::GroupEpoch { .. })).collect();
    if epochs.is_empty() {
        return;
    }
    epochs.sort_by_key(|op| op.invoke_ms);
    let mut acked: HashSet<&str> = HashSet::new();
    let mut drained = false;
    for op in epochs {
        let OpKind::GroupEpoch { consumer, epoch, checkpoint_before, deliveries, ended, drain } = &op.kind else { unreachable!() };
        let name = format!("op {}: group consumer {consumer} epoch {epoch}", op.id);
        drained |= *drain && ended == "drained";
        let mut last_version: HashMap<&str, u64> = HashMap::new();
        for delivery in deliveries {
            report.group_deliveries += 1;
            if all.get(delivery.position as usize).is_none_or(|found| found.id != delivery.id) {
                report.flag("group_wrong_event", format!("{name} delivered {} at position {}, which $all does not hold there", delivery.id, delivery.position));
            }
            if checkpoint_before.is_some_and(|checkpoint| delivery.position < checkpoint) {
                report.flag(
                    "group_below_checkpoint",
                    format!("{name} delivered position {} below the checkpoint {checkpoint_before:?} observed before connecting", delivery.position),
                );
            }
            if let Some(previous) = last_version.insert(delivery.stream.as_str(), delivery.version)
                && delivery.version < previous
            {
                report.flag("group_unordered", format!("{name} delivered {}@{} after version {previous}", delivery.stream, delivery.version));
            }
            if acked.contains(delivery.id.as_str()) {
                report.group_redeliveries_after_ack += 1;
            }
            if delivery.answer == GroupAnswer::Ack {
                acked.insert(delivery.id.as_str());
            }
        }
    }
    if !drained {
        report.flag("group_not_drained", "the draining consumer did not see the group settle".into());
        return;
    }
    for event in all.iter().filter(|e| !e.stream.starts_with('$')) {
        if !acked.contains(event.id.as_str()) {
            report.flag("group_not_acked", format!("event {} at position {} was never acked by a group consumer", event.id, event.position));
        }
    }
}

/// Gapless positions, contiguous versions, no duplicate ids.
fn check_shape(all: &[FinalEvent], report: &mut Report) {
    let mut next_version: HashMap<&str, u64> = HashMap::new();
    let mut seen: HashSet<&str> = HashSet::new();
    for (index, event) in all.iter().enumerate() {
        if event.position != index as u64 {
            report.flag("position_gap", format!("index {index} holds position {}", event.position));
        }
        let expected = next_version.entry(event.stream.as_str()).or_insert(0);
        if event.version != *expected {
            report.flag("version_gap", format!("{}: version {} where {} was due", event.stream, event.version, expected));
        }
        *expected = event.version + 1;
        if !seen.insert(event.id.as_str()) {
            report.flag("duplicate", format!("event {} appears again at position {}", event.id, event.position));
        }
    }
}

/// Each stream's event ids in version order.
fn stream_orders(all: &[FinalEvent]) -> HashMap<&str, Vec<&str>> {
    let mut streams: HashMap<&str, Vec<&str>> = HashMap::new();
    for event in all {
        streams.entry(event.stream.as_str()).or_default().push(event.id.as_str());
    }
    streams
}

fn check_appends(ops: &[Op], by_id: &HashMap<&str, &FinalEvent>, report: &mut Report) {
    let mut attempted: HashSet<&str> = HashSet::new();
    // (stream, exact version) → the event ids of the append that succeeded with it.
    let mut occ_winners: HashMap<(&str, u64), (&[String], u64)> = HashMap::new();
    for op in ops {
        let OpKind::Append { stream, expected, event_ids, outcome } = &op.kind else { continue };
        attempted.extend(event_ids.iter().map(String::as_str));
        let AppendOutcome::Ok { first_version, first_position, .. } = outcome else { continue };
        report.acknowledged_events += event_ids.len() as u64;
        for (offset, id) in event_ids.iter().enumerate() {
            let (version, position) = (first_version + offset as u64, first_position + offset as u64);
            match by_id.get(id.as_str()) {
                None => report.flag("lost", format!("op {}: event {id} acknowledged at {stream}@{version} #{position}", op.id)),
                Some(found) if (found.stream.as_str(), found.version, found.position) != (stream.as_str(), version, position) => {
                    report.flag(
                        "moved",
                        format!("op {}: event {id} acknowledged at {stream}@{version} #{position}, found at {}@{} #{}", op.id, found.stream, found.version, found.position),
                    )
                }
                Some(_) => {}
            }
        }
        if let Expected::Exact(version) = expected {
            match occ_winners.get(&(stream.as_str(), *version)) {
                // The same append acknowledged twice (a retry answered as a replay) is one success.
                Some((ids, _)) if *ids == event_ids.as_slice() => {}
                Some((_, first_op)) => report.flag(
                    "double_occ_success",
                    format!("ops {first_op} and {} both succeeded on {stream} expecting version {version}", op.id),
                ),
                None => {
                    occ_winners.insert((stream.as_str(), *version), (event_ids.as_slice(), op.id));
                }
            }
        }
    }
    for id in by_id.keys() {
        if !attempted.contains(id) {
            report.flag("phantom", format!("event {id} in $all was never appended by a client"));
        }
    }
}

/// An acknowledged append as reads judge it: (complete time, commit token, event ids).
type AckedAppend<'a> = (u64, u64, &'a [String]);

fn check_reads(ops: &[Op], streams: &HashMap<&str, Vec<&str>>, report: &mut Report) {
    let mut acked: HashMap<&str, Vec<AckedAppend<'_>>> = HashMap::new();
    for op in ops {
        if let OpKind::Append { stream, event_ids, outcome: AppendOutcome::Ok { commit_token, .. }, .. } = &op.kind {
            acked.entry(stream.as_str()).or_default().push((op.complete_ms, *commit_token, event_ids.as_slice()));
        }
    }
    let empty: Vec<&str> = Vec::new();
    for op in ops {
        let OpKind::ReadStream { stream, consistency, outcome } = &op.kind else { continue };
        let returned: Vec<&str> = match outcome {
            ReadOutcome::Ok { event_ids } => event_ids.iter().map(String::as_str).collect(),
            ReadOutcome::NotFound => Vec::new(),
            ReadOutcome::Failed { .. } => continue,
        };
        let final_order = streams.get(stream.as_str()).unwrap_or(&empty);
        if returned.len() > final_order.len() || returned[..] != final_order[..returned.len()] {
            report.flag("read_not_prefix", format!("op {}: read of {stream} is not a prefix of its final order", op.id));
        }
        let present: HashSet<&str> = returned.iter().copied().collect();
        let must_see = |(complete_ms, token, _): &&(u64, u64, &[String])| match consistency {
            Consistency::Linearizable => *complete_ms < op.invoke_ms,
            Consistency::Session(session) => token <= session,
            Consistency::Local => false,
        };
        for (_, _, ids) in acked.get(stream.as_str()).into_iter().flatten().filter(must_see) {
            if let Some(missing) = ids.iter().find(|id| !present.contains(id.as_str())) {
                let kind = if matches!(consistency, Consistency::Linearizable) { "stale_read" } else { "session_behind" };
                report.flag(kind, format!("op {}: read of {stream} misses acknowledged event {missing}", op.id));
            }
        }
    }
}

/// One subscription's epochs in epoch order: (epoch, after, delivered, checkpoint, op id).
type Epoch<'a> = (u32, Option<u64>, &'a [Delivered], Option<u64>, u64);

fn check_subscriptions(ops: &[Op], all: &[FinalEvent], report: &mut Report) {
    let mut subscriptions: BTreeMap<u32, Vec<Epoch<'_>>> = BTreeMap::new();
    for op in ops {
        if let OpKind::SubscriptionEpoch { subscription, epoch, after, delivered, checkpoint, .. } = &op.kind {
            subscriptions.entry(*subscription).or_default().push((*epoch, *after, delivered.as_slice(), *checkpoint, op.id));
        }
    }
    for (subscription, mut epochs) in subscriptions {
        epochs.sort_by_key(|epoch| epoch.0);
        let mut stored: Option<u64> = None;
        for (epoch, after, delivered, checkpoint, op) in epochs {
            let name = format!("op {op}: subscription {subscription} epoch {epoch}");
            if after != stored {
                report.flag("dishonest_checkpoint", format!("{name} resubscribed after {after:?}, but the stored checkpoint was {stored:?}"));
            }
            let mut next = after.map_or(0, |p| p + 1);
            for event in delivered {
                if event.position < next {
                    report.flag("subscription_duplicate", format!("{name} delivered position {} again (next due {next})", event.position));
                } else if event.position > next {
                    report.flag("subscription_gap", format!("{name} skipped positions {next}..{}", event.position));
                }
                next = next.max(event.position + 1);
                if all.get(event.position as usize).is_none_or(|found| found.id != event.id) {
                    report.flag("subscription_wrong_event", format!("{name} delivered {} at position {}, which $all does not hold there", event.id, event.position));
                }
            }
            let delivered_up_to = delivered.last().map(|event| event.position).or(after);
            if checkpoint > delivered_up_to {
                report.flag("dishonest_checkpoint", format!("{name} stored checkpoint {checkpoint:?} past its last delivery {delivered_up_to:?}"));
            }
            stored = checkpoint;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(id: u64, stream: &str, expected: Expected, ids: &[&str], outcome: AppendOutcome, at: u64) -> Op {
        Op {
            id,
            client: 1,
            node: 1,
            invoke_ms: at,
            complete_ms: at + 1,
            kind: OpKind::Append { stream: stream.into(), expected, event_ids: ids.iter().map(|s| s.to_string()).collect(), outcome },
        }
    }

    fn ok(version: u64, position: u64, token: u64) -> AppendOutcome {
        AppendOutcome::Ok { first_version: version, first_position: position, commit_token: token, replay: false }
    }

    fn read(id: u64, stream: &str, consistency: Consistency, ids: &[&str], at: u64) -> Op {
        Op {
            id,
            client: 2,
            node: 2,
            invoke_ms: at,
            complete_ms: at + 1,
            kind: OpKind::ReadStream {
                stream: stream.into(),
                consistency,
                outcome: ReadOutcome::Ok { event_ids: ids.iter().map(|s| s.to_string()).collect() },
            },
        }
    }

    fn epoch(id: u64, epoch: u32, after: Option<u64>, positions: &[(&str, u64)], checkpoint: Option<u64>) -> Op {
        Op {
            id,
            client: 9,
            node: 3,
            invoke_ms: 0,
            complete_ms: 70,
            kind: OpKind::SubscriptionEpoch {
                subscription: 1,
                epoch,
                after,
                delivered: positions.iter().map(|(id, position)| Delivered { id: id.to_string(), position: *position }).collect(),
                checkpoint,
                ended: "dropped".into(),
            },
        }
    }

    fn event(id: &str, stream: &str, version: u64, position: u64) -> FinalEvent {
        FinalEvent { id: id.into(), stream: stream.into(), version, position }
    }

    fn on_all_nodes(events: Vec<FinalEvent>) -> BTreeMap<u64, Vec<FinalEvent>> {
        (1..=3).map(|node| (node, events.clone())).collect()
    }

    /// A correct history: two appends to `s`, one to `t`, reads at every level.
    fn good() -> (Vec<Op>, Vec<FinalEvent>) {
        let ops = vec![
            append(1, "s", Expected::NoStream, &["a", "b"], ok(0, 0, 2), 10),
            append(2, "t", Expected::Any, &["c"], ok(0, 2, 3), 20),
            append(3, "s", Expected::Exact(1), &["d"], ok(2, 3, 4), 30),
            append(4, "s", Expected::Exact(1), &["e"], AppendOutcome::WrongVersion { actual: Some(2) }, 31),
            append(5, "t", Expected::Any, &["f"], AppendOutcome::Indeterminate { reason: "timeout".into() }, 40),
            read(6, "s", Consistency::Linearizable, &["a", "b", "d"], 50),
            read(7, "s", Consistency::Session(2), &["a", "b"], 25),
            read(8, "s", Consistency::Local, &["a"], 26),
            // Two epochs: the second resubscribes after the first's checkpoint (1) and
            // sees "b" again only in a new epoch, which is allowed.
            epoch(20, 0, None, &[("a", 0), ("b", 1)], Some(0)),
            epoch(21, 1, Some(0), &[("b", 1), ("c", 2), ("d", 3)], Some(3)),
        ];
        let all = vec![event("a", "s", 0, 0), event("b", "s", 1, 1), event("c", "t", 0, 2), event("d", "s", 2, 3)];
        (ops, all)
    }

    #[test]
    fn a_correct_history_has_no_anomaly() {
        let (ops, all) = good();
        let report = check(&ops, &on_all_nodes(all));
        assert_eq!(report.anomalies(), 0, "{report}");
        assert_eq!(report.acknowledged_events, 4);
    }

    #[test]
    fn a_lost_write_is_caught() {
        let (ops, mut all) = good();
        all.pop(); // "d", acknowledged, is gone
        let report = check(&ops, &on_all_nodes(all));
        assert_eq!(report.count("lost"), 1, "{report}");
    }

    #[test]
    fn a_moved_write_is_caught() {
        let (mut ops, all) = good();
        ops[2] = append(3, "s", Expected::Exact(1), &["d"], ok(2, 7, 4), 30);
        assert_eq!(check(&ops, &on_all_nodes(all)).count("moved"), 1);
    }

    #[test]
    fn a_duplicate_is_caught() {
        let (ops, mut all) = good();
        all.push(event("d", "s", 3, 4)); // the indeterminate retry landed twice
        let report = check(&ops, &on_all_nodes(all));
        assert_eq!(report.count("duplicate"), 1, "{report}");
    }

    #[test]
    fn a_double_occ_success_is_caught_but_a_replay_is_not() {
        let (mut ops, mut all) = good();
        // A replay of op 3 answered with the original result: one success.
        ops.push(append(9, "s", Expected::Exact(1), &["d"], ok(2, 3, 4), 35));
        assert_eq!(check(&ops, &on_all_nodes(all.clone())).anomalies(), 0);
        // A different append also succeeding with expected version 1.
        ops.push(append(10, "s", Expected::Exact(1), &["g"], ok(3, 4, 5), 36));
        all.push(event("g", "s", 3, 4));
        assert_eq!(check(&ops, &on_all_nodes(all)).count("double_occ_success"), 1);
    }

    #[test]
    fn a_stale_linearizable_read_and_a_session_read_behind_its_token_are_caught() {
        let (mut ops, all) = good();
        ops.push(read(11, "s", Consistency::Linearizable, &["a", "b"], 60)); // misses "d", acked at 31
        ops.push(read(12, "s", Consistency::Session(4), &["a", "b"], 60)); // token 4 covers "d"
        ops.push(read(13, "s", Consistency::Local, &["a", "b"], 60)); // local may lag: fine
        let report = check(&ops, &on_all_nodes(all));
        assert_eq!(report.count("stale_read"), 1, "{report}");
        assert_eq!(report.count("session_behind"), 1, "{report}");
        assert_eq!(report.anomalies(), 2);
    }

    #[test]
    fn a_reordered_read_is_caught() {
        let (mut ops, all) = good();
        ops.push(read(14, "s", Consistency::Local, &["b", "a"], 60));
        assert_eq!(check(&ops, &on_all_nodes(all)).count("read_not_prefix"), 1);
    }

    #[test]
    fn a_phantom_event_gaps_and_divergence_are_caught() {
        let (ops, all) = good();
        let mut finals = on_all_nodes(all.clone());
        let mut bad = all.clone();
        bad.push(event("zzz", "t", 2, 5)); // never appended; version 1 and position 4 skipped
        finals.insert(2, bad.clone());
        let report = check(&ops, &finals);
        assert_eq!(report.count("divergent_all"), 1, "{report}");
        let report = check(&ops, &on_all_nodes(bad));
        assert_eq!(report.count("phantom"), 1, "{report}");
        assert_eq!(report.count("version_gap"), 1, "{report}");
        assert_eq!(report.count("position_gap"), 1, "{report}");
    }

    #[test]
    fn a_subscription_gap_duplicate_wrong_event_and_dishonest_checkpoint_are_caught() {
        let (mut ops, all) = good();
        let base = ops.len();
        ops.truncate(base - 2);
        ops.push(epoch(20, 0, None, &[("a", 0), ("c", 2)], Some(2))); // skipped "b"
        assert_eq!(check(&ops, &on_all_nodes(all.clone())).count("subscription_gap"), 1);
        ops.pop();
        ops.push(epoch(20, 0, None, &[("a", 0), ("b", 1), ("b", 1)], Some(1))); // "b" twice in one epoch
        assert_eq!(check(&ops, &on_all_nodes(all.clone())).count("subscription_duplicate"), 1);
        ops.pop();
        ops.push(epoch(20, 0, None, &[("a", 0), ("x", 1)], Some(1))); // not what $all holds at 1
        assert_eq!(check(&ops, &on_all_nodes(all.clone())).count("subscription_wrong_event"), 1);
        ops.pop();
        ops.push(epoch(20, 0, None, &[("a", 0)], Some(2))); // checkpoint past the delivery
        ops.push(epoch(21, 1, Some(1), &[("c", 2)], Some(2))); // and not resubscribed after it
        let report = check(&ops, &on_all_nodes(all));
        assert_eq!(report.count("dishonest_checkpoint"), 2, "{report}");
    }

    fn group_epoch(id: u64, at: u64, checkpoint_before: Option<u64>, deliveries: &[(&str, &str, u64, u64, GroupAnswer)], ended: &str, drain: bool) -> Op {
        Op {
            id,
            client: 20_000,
            node: 1,
            invoke_ms: at,
            complete_ms: at + 5,
            kind: OpKind::GroupEpoch {
                consumer: 0,
                epoch: id as u32,
                checkpoint_before,
                deliveries: deliveries
                    .iter()
                    .map(|(id, stream, version, position, answer)| crate::history::GroupDelivery {
                        id: id.to_string(),
                        stream: stream.to_string(),
                        version: *version,
                        position: *position,
                        retry_count: 0,
                        answer: *answer,
                    })
                    .collect(),
                ended: ended.into(),
                drain,
            },
        }
    }

    #[test]
    fn the_groups_invariants_hold_a_correct_history_and_catch_each_violation() {
        use GroupAnswer::{Ack, Retry};
        let (mut ops, all) = good();
        // Epoch 1 acks a, retries b; a leader change ends it. The drain acks the rest; b
        // is delivered again (allowed: it was never acked), c and d for the first time.
        ops.push(group_epoch(30, 100, Some(0), &[("a", "s", 0, 0, Ack), ("b", "s", 1, 1, Retry)], "dropped", false));
        ops.push(group_epoch(31, 200, Some(1), &[("b", "s", 1, 1, Ack), ("c", "t", 0, 2, Ack), ("d", "s", 2, 3, Ack)], "drained", true));
        let report = check(&ops, &on_all_nodes(all.clone()));
        assert_eq!(report.anomalies(), 0, "{report}");
        assert_eq!((report.group_deliveries, report.group_redeliveries_after_ack), (5, 0));

        // An event below the checkpoint observed before connecting.
        let mut below = ops.clone();
        *below.last_mut().unwrap() = group_epoch(31, 200, Some(2), &[("b", "s", 1, 1, Ack), ("c", "t", 0, 2, Ack), ("d", "s", 2, 3, Ack)], "drained", true);
        assert_eq!(check(&below, &on_all_nodes(all.clone())).count("group_below_checkpoint"), 1);
        // A stream going back within one connection.
        let mut unordered = ops.clone();
        *unordered.last_mut().unwrap() = group_epoch(31, 200, Some(1), &[("d", "s", 2, 3, Ack), ("b", "s", 1, 1, Ack), ("c", "t", 0, 2, Ack)], "drained", true);
        assert_eq!(check(&unordered, &on_all_nodes(all.clone())).count("group_unordered"), 1);
        // An event never acked (d), and a delivery $all does not hold.
        let mut missing = ops.clone();
        *missing.last_mut().unwrap() = group_epoch(31, 200, Some(1), &[("b", "s", 1, 1, Ack), ("c", "t", 0, 2, Ack), ("x", "s", 2, 3, Ack)], "drained", true);
        let report = check(&missing, &on_all_nodes(all.clone()));
        assert_eq!((report.count("group_not_acked"), report.count("group_wrong_event")), (1, 1), "{report}");
        // A drain that never saw the group settle.
        let mut undrained = ops.clone();
        *undrained.last_mut().unwrap() = group_epoch(31, 200, Some(1), &[("b", "s", 1, 1, Ack)], "stopped", true);
        assert_eq!(check(&undrained, &on_all_nodes(all.clone())).count("group_not_drained"), 1);
        // A redelivery after an ack is counted (a figure, not an anomaly: at-least-once).
        let mut again = ops;
        again.push(group_epoch(32, 300, Some(1), &[("c", "t", 0, 2, Ack)], "stopped", false));
        let report = check(&again, &on_all_nodes(all));
        assert_eq!((report.anomalies(), report.group_redeliveries_after_ack), (0, 1), "{report}");
    }
}
