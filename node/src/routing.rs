//! Where a request is served: leader forwarding for writes, and read consistency.
//!
//! Writes go to the leader; a follower forwards them once, marked with
//! [`FORWARDED_HEADER`] so a request is never bounced twice. Reads are served from the
//! local applied state after the consistency level's wait:
//! - linearizable: the leader confirms its leadership with a quorum (read index); a
//!   follower asks the leader for that index and waits to apply it;
//! - session: wait to apply the client's commit token;
//! - local: no wait.

use std::time::Duration;

use openraft::raft::ReadPolicy;
use openraft::async_runtime::WatchReceiver;
use strata_proto::v1::raft::raft_transport_client::RaftTransportClient;
use strata_proto::v1::raft::ReadIndexRequest;
use strata_proto::v1::Consistency;
use strata_raft::{AppliedWatch, NodeId, PeerChannels, Raft, ResyncGate};
use tonic::transport::Channel;

use crate::error::{detail_of, ApiError};
use tonic::Status;
use crate::limits::{LEADER_CHANGE_WAIT_MS, LEADER_WAIT_TIMEOUT_MS, READ_WAIT_TIMEOUT_MS};

/// Marks a request forwarded by a follower.
pub const FORWARDED_HEADER: &str = "x-strata-forwarded";
/// How often a node re-syncing after a corrupt raft log checks whether it has caught up.
pub const RESYNC_POLL_MS: u64 = 500;

/// Where to send a write.
pub enum Route {
    /// This node leads.
    Local,
    /// Forward to the leader over this channel.
    Leader { id: NodeId, channel: Channel },
}

/// This node's view of the cluster for routing.
#[derive(Clone)]
pub struct Router {
    pub node_id: NodeId,
    pub raft: Raft,
    pub applied: AppliedWatch,
    pub channels: PeerChannels,
}

/// Whether a request was forwarded by another node.
pub fn is_forwarded<T>(request: &tonic::Request<T>) -> bool {
    request.metadata().contains_key(FORWARDED_HEADER)
}

/// Marks a request as forwarded.
pub fn mark_forwarded<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(FORWARDED_HEADER, tonic::metadata::MetadataValue::from_static("1"));
    request
}

/// A forwarded call's failure: our own typed errors pass through unchanged; a transport
/// failure after the request left may have committed it, so it is indeterminate.
pub fn forwarded_failure(status: Status) -> Status {
    if detail_of(&status).is_some() {
        return status;
    }
    ApiError::Indeterminate { reason: format!("forwarding to the leader failed: {}", status.message()), deadline: false }
        .into_status()
}

/// Encodes a commit token (the log index an append or read is covered by).
pub fn commit_token(log_index: u64) -> String {
    log_index.to_string()
}

/// Decodes a commit token.
pub fn parse_commit_token(token: &str) -> Result<u64, ApiError> {
    token.trim().parse().map_err(|_| ApiError::InvalidArgument {
        field: "session_token".into(),
        reason: format!("not a commit token: `{token}`"),
    })
}

impl Router {
    /// Waits up to `timeout_ms` for `found` to return something from this node's Raft
    /// metrics, checking the current metrics first and then every change.
    async fn wait_for_metrics<T>(&self, timeout_ms: u64, mut found: impl FnMut(&strata_raft::RaftMetrics) -> Option<T>) -> Option<T> {
        let mut metrics = self.raft.metrics();
        let wait = async {
            loop {
                if let Some(value) = found(&metrics.borrow_and_update()) {
                    return Some(value);
                }
                if metrics.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(Duration::from_millis(timeout_ms), wait).await.ok().flatten()
    }

    /// The leader's id and address, waiting up to `LEADER_WAIT_TIMEOUT_MS` for an election.
    pub async fn leader(&self) -> Result<(NodeId, String), ApiError> {
        let leader = self
            .wait_for_metrics(LEADER_WAIT_TIMEOUT_MS, |current| {
                let leader = current.current_leader?;
                let node = current.membership_config.membership().get_node(&leader)?;
                Some((leader, node.addr.clone()))
            })
            .await;
        leader.ok_or_else(|| ApiError::Unavailable {
            reason: format!("no leader elected within LEADER_WAIT_TIMEOUT_MS={LEADER_WAIT_TIMEOUT_MS}"),
            leader_id: None,
            leader_addr: None,
        })
    }

    /// Whether this node's Raft metrics name it the leader right now.
    pub fn believes_it_leads(&self) -> bool {
        self.raft.metrics().borrow_watched().current_leader == Some(self.node_id)
    }

    /// Waits (at most `LEADER_CHANGE_WAIT_MS`) until this node knows a leader other than
    /// `old`; returns early if one is known already. After the wait the caller routes again
    /// either way: the old leader may simply still lead.
    pub async fn wait_for_other_leader(&self, old: NodeId) {
        self.wait_for_metrics(LEADER_CHANGE_WAIT_MS, |current| current.current_leader.filter(|leader| *leader != old))
            .await;
    }

    /// Where a write must go. A forwarded request that lands on a non-leader is refused
    /// (definite: nothing was proposed), with the leader this node believes in.
    pub async fn route_write(&self, forwarded: bool) -> Result<Route, ApiError> {
        let (leader, addr) = self.leader().await?;
        if leader == self.node_id {
            return Ok(Route::Local);
        }
        if forwarded {
            return Err(ApiError::Unavailable {
                reason: "forwarded to a node that is not the leader".into(),
                leader_id: Some(leader),
                leader_addr: Some(addr),
            });
        }
        let channel = self.channels.get(&addr).map_err(|e| ApiError::Unavailable {
            reason: format!("bad leader address `{addr}`: {e}"),
            leader_id: Some(leader),
            leader_addr: Some(addr.clone()),
        })?;
        Ok(Route::Leader { id: leader, channel })
    }

    /// Runs a call on the leader: `local` when this node leads, else `remote` over a
    /// channel to the leader (once: a forwarded call is never forwarded again).
    pub async fn on_leader<T, Local, Remote>(
        &self,
        forwarded: bool,
        local: impl FnOnce() -> Local,
        remote: impl FnOnce(Channel) -> Remote,
    ) -> Result<tonic::Response<T>, tonic::Status>
    where
        Local: std::future::Future<Output = Result<T, ApiError>>,
        Remote: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match self.route_write(forwarded).await? {
            Route::Local => Ok(tonic::Response::new(local().await?)),
            Route::Leader { channel, .. } => remote(channel).await,
        }
    }

    /// Waits until this node has applied `log_index`.
    pub async fn wait_applied(&self, log_index: u64, what: &str) -> Result<(), ApiError> {
        let mut applied = self.applied.clone();
        let wait = applied.wait_for(|index| *index >= log_index);
        match tokio::time::timeout(Duration::from_millis(READ_WAIT_TIMEOUT_MS), wait).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(ApiError::Unavailable {
                reason: format!("{what} {log_index} not applied on this node within READ_WAIT_TIMEOUT_MS={READ_WAIT_TIMEOUT_MS}"),
                leader_id: None,
                leader_addr: None,
            }),
        }
    }

    /// Makes the local state fresh enough for a read at `consistency`; returns the commit
    /// token the read is served at.
    pub async fn prepare_read(&self, consistency: i32, session_token: &str) -> Result<String, ApiError> {
        match Consistency::try_from(consistency) {
            Ok(Consistency::Local) => {}
            Ok(Consistency::Session) => {
                let index = parse_commit_token(session_token)?;
                self.wait_applied(index, "session token").await?;
            }
            Ok(Consistency::Linearizable) => self.linearize().await?,
            Err(_) => {
                return Err(ApiError::InvalidArgument {
                    field: "consistency".into(),
                    reason: format!("unknown consistency level {consistency}"),
                })
            }
        }
        Ok(commit_token(*self.applied.borrow()))
    }

    /// Holds `gate` closed until this node has applied everything another node, as
    /// leader, had committed (a read index taken from it); then lets the node vote and
    /// stand for election again.
    pub async fn resync_from_leader(&self, gate: &ResyncGate) {
        loop {
            tokio::time::sleep(Duration::from_millis(RESYNC_POLL_MS)).await;
            match self.leader().await {
                Ok((leader, _)) if leader != self.node_id => {}
                _ => continue,
            }
            match self.linearize().await {
                Ok(()) => {
                    gate.open();
                    self.raft.runtime_config().elect(true);
                    tracing::info!(node_id = self.node_id, applied = *self.applied.borrow(), "re-synced from the leader after a corrupt raft log: voting again");
                    return;
                }
                Err(e) => tracing::info!(node_id = self.node_id, error = %e, "still re-syncing from the leader"),
            }
        }
    }

    /// Waits until this node's applied state holds everything committed when it was
    /// called (a read index; on the leader, after confirming leadership).
    pub async fn linearize(&self) -> Result<(), ApiError> {
        let (leader, addr) = self.leader().await?;
        if leader == self.node_id {
            self.raft.ensure_linearizable(ReadPolicy::ReadIndex).await.map_err(|e| ApiError::Unavailable {
                reason: format!("leadership not confirmed: {e}"),
                leader_id: None,
                leader_addr: None,
            })?;
            return Ok(());
        }
        let unavailable = |reason: String| ApiError::Unavailable { reason, leader_id: Some(leader), leader_addr: Some(addr.clone()) };
        let channel = self.channels.get(&addr).map_err(|e| unavailable(e.to_string()))?;
        let mut request = tonic::Request::new(ReadIndexRequest {});
        request.set_timeout(Duration::from_millis(READ_WAIT_TIMEOUT_MS));
        let read_index = RaftTransportClient::new(channel)
            .read_index(request)
            .await
            .map_err(|s| unavailable(format!("read index from leader failed: {}", s.message())))?
            .into_inner()
            .read_index;
        self.wait_applied(read_index, "read index").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_tokens_round_trip_and_reject_garbage() {
        assert_eq!(parse_commit_token(&commit_token(42)).unwrap(), 42);
        assert!(parse_commit_token("x").is_err());
    }
}
