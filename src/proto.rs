//! The generated `skykit.agent.v1` types; only `server.rs`, `client.rs` and
//! the CLI's output formatting use them.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("skykit.agent.v1");

/// The encoded descriptors of `proto/`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/skykit_agent_descriptor.bin"));
