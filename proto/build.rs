//! Generates the tonic/prost code with a vendored `protoc`, so a fresh machine needs only cargo.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let protos = [
        "strata/v1/streams.proto",
        "strata/v1/subscriptions.proto",
        "strata/v1/snapshots.proto",
        "strata/v1/persistent.proto",
        "strata/v1/cluster.proto",
        "strata/v1/raft.proto",
        "strata/v1/auth.proto",
    ];
    // Payloads as `Bytes`: a receiver decodes them as slices of the received buffer instead
    // of copying each into its own allocation, and a copy of a message (a retried append,
    // a client's reused payload) shares them (reads and appends run at 10^5-10^6 events/s).
    tonic_prost_build::configure()
        .bytes(".strata.v1.RecordedEvent.data")
        .bytes(".strata.v1.RecordedEvent.metadata")
        .bytes(".strata.v1.ProposedEvent.data")
        .bytes(".strata.v1.ProposedEvent.metadata")
        // A follower decodes each AppendEntries (often megabytes) from the received buffer.
        .bytes(".strata.v1.raft.RaftMessage.payload")
        // Written by hand, so a server can send events encoded straight from storage
        // (read_response.rs); the wire form is the proto's. prost still generates the message
        // it was told is external: compiled out, so `v1::ReadResponse` is the hand-written one.
        .extern_path(".strata.v1.ReadResponse", "crate::read_response::ReadResponse")
        .message_attribute(".strata.v1.ReadResponse", "#[cfg(any())]")
        // Each message encoded at its exact size, not into a doubling buffer (see codec.rs).
        .codec_path("crate::codec::SizedProstCodec")
        .compile_protos(&protos, &["."])?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
