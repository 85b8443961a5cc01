//! The integration tests' cluster harness lives in `tests/chaos` (`strata_chaos::cluster`),
//! shared with the chaos suite's runner: one harness for both.
#![allow(unused_imports)]

pub use strata_chaos::cluster::*;
