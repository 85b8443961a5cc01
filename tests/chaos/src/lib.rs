//! The chaos suite (issue 5): proves the guarantees of SPEC §3 under faults.
//!
//! - [`cluster`]: real `strata serve` processes on 127.0.<subnet>.x (also the integration
//!   tests' harness);
//! - [`workload`]: seeded clients (OCC appends, reads at every consistency level,
//!   catch-up subscribers) recording every operation;
//! - [`nemesis`]: the faults (kill -9, SIGSTOP, nftables partitions, libfaketime clock
//!   skew, a corrupted record, a crash of every node), each logged with start and end;
//! - [`history`]: the JSONL history and fault timeline;
//! - [`checker`]: the invariants, every anomaly counted by kind with examples;
//! - [`figures`]: operations, faults, recovery times and unavailable windows;
//! - [`scenario`]: named scenarios that put these together; `strata-chaos` runs one;
//! - [`compose`]: the same workload and checker against the docker-compose cluster, with
//!   faults through `strata cluster chaos --compose`.

pub mod checker;
pub mod cluster;
pub mod compose;
pub mod figures;
pub mod history;
pub mod nemesis;
pub mod scenario;
pub mod store_link;
pub mod workload;
