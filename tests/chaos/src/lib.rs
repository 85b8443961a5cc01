//! The chaos suite's history and its checker (issue 5).
//!
//! - [`history`]: what a run records: every operation (invoke and complete time, node,
//!   outcome, returned versions and positions) as JSONL, and every node's final `$all`;
//! - [`checker`]: the invariants of SPEC §3 checked over a history, with every anomaly
//!   counted by kind and the first examples kept.

pub mod checker;
pub mod history;
