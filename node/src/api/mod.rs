//! The public gRPC services.

pub mod auth;
pub mod cluster;
pub mod filter;
pub mod persistent;
pub mod snapshots;
pub mod streams;
pub mod subscriptions;
pub mod validate;

use std::sync::Arc;

use strata_storage::EventState;

use crate::batcher::Batcher;
use crate::metrics::Metrics;
use crate::routing::Router;

/// What every service needs: routing, the applied state, the batcher, metrics, settings.
pub struct NodeContext {
    pub router: Router,
    pub events: Arc<EventState>,
    /// Reads of all history, hot and tiered.
    pub reader: strata_storage::EventReader,
    /// The object-store tier, when configured.
    pub tier: Option<Arc<crate::tier::TierRuntime>>,
    pub batcher: Batcher,
    pub metrics: Arc<Metrics>,
    pub max_event_bytes: usize,
    pub max_snapshot_bytes: usize,
    pub grpc_addr: String,
    pub http_addr: String,
    /// Persistent subscription groups this node runs as leader.
    pub groups: crate::groups::Groups,
    /// Gossip, when this node runs it (a cluster secret was given).
    pub gossip: Option<Arc<strata_gossip::Gossip>>,
    /// Who may do what: users, rules, tokens.
    pub access: Arc<crate::access::Access>,
    /// One permit per live subscription (`--max-subscriptions`).
    pub subscription_slots: Arc<tokio::sync::Semaphore>,
    pub max_subscriptions: usize,
}

/// Reads of every stream (`ReadAll`, `ListStreams`, `$all` subscriptions and groups) are
/// checked as reads of this name: admin-only unless a rule opens it.
pub const ALL_STREAMS: &str = "$all";

impl NodeContext {
    /// Whether the request's caller may `access` `stream` (PERMISSION_DENIED if not).
    pub fn allow<T>(&self, request: &tonic::Request<T>, access: strata_security::StreamAccess, stream: &str) -> Result<(), crate::error::ApiError> {
        self.access.stream(&crate::access::caller(request)?, access, stream)
    }
}
