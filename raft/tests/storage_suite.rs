//! Goal: our log store and state machine satisfy openraft's own storage conformance suite.
//! Method: `openraft::testing::log::Suite::test_all` against fresh sled stores in temp dirs.

use std::sync::Arc;

use openraft::testing::log::{StoreBuilder, Suite};
use openraft::StorageError;
use strata_raft::{LogStore, StateMachine, TypeConfig};
use strata_storage::{open_database, EventState, RaftLogStore};

struct SledStoreBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for SledStoreBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = open_database(dir.path()).expect("open sled");
        let raft_store = RaftLogStore::open(&db, dir.path()).expect("open raft log");
        let events = Arc::new(EventState::open(&db, dir.path()).expect("open state"));
        let machine = StateMachine::new(events, raft_store.clone(), &dir.path().join("snapshots")).expect("state machine");
        Ok((dir, LogStore::new(raft_store), machine))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_passes() {
    Suite::test_all(SledStoreBuilder).await.expect("openraft storage suite");
}
