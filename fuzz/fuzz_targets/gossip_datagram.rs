//! The gossip datagram parser (S5, S10): every datagram a node's UDP port receives goes
//! through `Opener::open` before chitchat sees it. Arbitrary bytes must never panic and
//! never open; a datagram sealed with the cluster key opens to its payload exactly once
//! (a replay is dropped), and any single flipped byte makes it drop.

#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_gossip::auth::{Opener, Sealer};

const SECRET: &[u8] = b"fuzzing cluster secret";

fuzz_target!(|data: &[u8]| {
    let mut opener = Opener::new(SECRET, "fuzz");
    assert!(opener.open(data).is_err(), "raw bytes never authenticate");
    let Some((&flip, payload)) = data.split_first() else { return };
    let mut sealer = Sealer::new(SECRET, "fuzz", 1);
    let mut datagram = Vec::new();
    sealer.seal(payload, &mut datagram);
    assert_eq!(opener.open(&datagram).ok(), Some(payload), "a sealed datagram opens to its payload");
    assert!(opener.open(&datagram).is_err(), "a replay is dropped");
    let mut tampered = Vec::new();
    sealer.seal(payload, &mut tampered);
    let at = flip as usize % tampered.len();
    tampered[at] ^= 0x5a;
    assert!(opener.open(&tampered).is_err(), "a flipped byte at {at} is dropped");
});
