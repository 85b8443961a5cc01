//! Wall-clock time, in one place: event `created` timestamps are the only wall-clock
//! values that reach replicated state, and the leader stamps them before proposing.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
