//! The tier against a real file object store: what is written durably reads back the
//! same, from every angle the node reads it.

use super::*;
use crate::chunk::EventChunk;
use crate::command::NewEvent;

fn event(n: u64) -> NewEvent {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&(n + 1).to_be_bytes());
    NewEvent { id, event_type: format!("t{n}"), content_type: "application/json".into(), data: vec![n as u8; 32], metadata: vec![] }
}

/// Chunks of 3 events, alternating between streams a and b.
fn chunks(count: u64) -> Vec<EventChunk> {
    let mut versions = [0u64; 2];
    (0..count)
        .map(|i| {
            let s = (i % 2) as usize;
            let chunk = EventChunk {
                stream: if s == 0 { "a".into() } else { "b".into() },
                first_version: versions[s],
                first_position: i * 3,
                created_unix_ms: 1,
                events: (0..3).map(|k| event(i * 3 + k)).collect(),
            };
            versions[s] += 3;
            chunk
        })
        .collect()
}

fn file_store() -> (tempfile::TempDir, TierStore) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let store = TierStore::open(&TierStoreConfig { url, ..Default::default() }).unwrap();
    (dir, store)
}

#[tokio::test]
async fn segments_read_back_by_position_stream_and_id() {
    let (_dir, store) = file_store();
    let reader = TierReader::new(store.clone());
    assert_eq!(reader.uploaded_through().await.unwrap(), 0, "no database yet reads as empty");
    let mut writer = TierWriter::open(&store, 1, 1).await.unwrap();
    let all = chunks(10);
    writer.write_segment(&all[..4]).await.unwrap();
    let stats = writer.write_segment(&all[4..]).await.unwrap();
    assert_eq!(stats.events, 18);
    assert_eq!(writer.uploaded_through(), 30);

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while reader.uploaded_through().await.unwrap() < 30 {
        assert!(std::time::Instant::now() < deadline, "the reader never saw the upload");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let forward = reader.read_all(4, false, 100, 30).await.unwrap();
    assert_eq!(forward.iter().map(|e| e.position).collect::<Vec<_>>(), (4..30).collect::<Vec<_>>());
    let limited = reader.read_all(0, false, 7, 20).await.unwrap();
    assert_eq!(limited.last().unwrap().position, 6);
    let backward = reader.read_all(10, true, 100, 30).await.unwrap();
    assert_eq!(backward.iter().map(|e| e.position).collect::<Vec<_>>(), (0..=10).rev().collect::<Vec<_>>());

    let b = reader.read_stream("b", 4, false, 100, 30).await.unwrap();
    assert_eq!(b.iter().map(|e| e.version).collect::<Vec<_>>(), (4..15).collect::<Vec<_>>());
    assert!(b.iter().all(|e| e.stream == "b"));
    let b_below = reader.read_stream("b", 0, false, 100, 10).await.unwrap();
    assert_eq!(b_below.iter().map(|e| e.position).collect::<Vec<_>>(), vec![3, 4, 5, 9]);
    let a_back = reader.read_stream("a", 7, true, 5, 30).await.unwrap();
    assert_eq!(a_back.iter().map(|e| e.version).collect::<Vec<_>>(), vec![7, 6, 5, 4, 3]);
    assert!(reader.read_stream("c", 0, false, 10, 30).await.unwrap().is_empty());

    let known = event(17).id;
    let unknown = [9u8; 16];
    let found = reader.lookup_ids(&[known, unknown]).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[&known].position, 17);
    assert_eq!(found[&known].stream, "b");
    writer.close().await;
}

#[tokio::test]
async fn a_newer_writer_fences_the_older_and_an_older_term_is_refused() {
    let (_dir, store) = file_store();
    let all = chunks(4);
    let mut old = TierWriter::open(&store, 3, 1).await.unwrap();
    old.write_segment(&all[..1]).await.unwrap();
    let mut new = TierWriter::open(&store, 4, 2).await.unwrap();
    assert_eq!(new.uploaded_through(), 3, "the new writer starts from what is durable");
    let fenced = old.write_segment(&all[1..2]).await;
    assert!(matches!(fenced, Err(TierError::Fenced(_))), "{fenced:?}");
    new.write_segment(&all[1..]).await.unwrap();
    match TierWriter::open(&store, 3, 1).await {
        Err(TierError::Fenced(message)) => assert!(message.contains("claimed_term=4"), "{message}"),
        other => panic!("an older term must be refused, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn a_corrupt_chunk_is_detected_not_served() {
    let (_dir, store) = file_store();
    let mut writer = TierWriter::open(&store, 1, 1).await.unwrap();
    writer.write_segment(&chunks(2)).await.unwrap();
    // A chunk sealed under another key: what a flipped bit or a misplaced write looks like.
    let good = crate::record::seal_value("x", &layout::chunk(2), &chunks(1)[0]).unwrap();
    let handle = writer.db_for_tests().put(layout::chunk(5), good).await.unwrap();
    // The writer has no WAL: a put is durable once its memtable is flushed.
    writer.db_for_tests().flush().await.unwrap();
    handle.await_durable().await.unwrap();
    writer.close().await;
    let reader = TierReader::new(store);
    let err = reader.read_all(3, false, 10, 6).await.unwrap_err();
    assert!(matches!(err, TierError::Corrupt(_)), "{err}");
}

#[tokio::test]
async fn a_tier_scavenge_drops_payloads_below_its_version_only_and_resumes_from_its_mark() {
    let (dir, store) = file_store();
    let mut writer = TierWriter::open(&store, 1, 1).await.unwrap();
    writer.write_segment(&chunks(6)).await.unwrap();
    assert_eq!(writer.scavenged_through("a").await.unwrap(), 0);
    // Stream a holds versions 0..9 in three chunks; scavenge below 4, one chunk per step.
    assert_eq!(writer.scavenge_stream("a", 0, 4, 3).await.unwrap(), (3, 3));
    assert_eq!(writer.scavenge_stream("a", 3, 4, 3).await.unwrap(), (1, 4));
    assert_eq!(writer.scavenge_stream("a", 4, 4, 3).await.unwrap(), (0, 4), "nothing left to do");
    assert_eq!(writer.scavenged_through("a").await.unwrap(), 4);
    drop(writer);
    let reader = TierReader::new(store.clone());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let a = reader.read_stream("a", 0, false, 100, 18).await.unwrap();
        let scavenged: Vec<u64> = a.iter().filter(|e| e.is_scavenged()).map(|e| e.version).collect();
        if scavenged == vec![0, 1, 2, 3] {
            assert!(a.iter().filter(|e| e.is_scavenged()).all(|e| e.data.len() == 32 && e.metadata.is_empty()));
            assert_eq!(a.iter().filter(|e| !e.is_scavenged()).map(|e| e.version).collect::<Vec<_>>(), vec![4, 5, 6, 7, 8]);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the reader never saw the scavenge: {scavenged:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let b = reader.read_stream("b", 0, false, 100, 18).await.unwrap();
    assert!(b.iter().all(|e| !e.is_scavenged()), "other streams untouched");
    drop(dir);
}
