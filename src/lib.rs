//! skykit-agent issues Skykit API access tokens (RS256 JWTs) to the
//! processes of a host over gRPC on a Unix socket, so that none of them
//! reads the private key.
//!
//! Modules in reading order: the CLI drives everything; `config` resolves
//! flags, environment and file; `key` owns key material; `token` builds
//! JWTs; `identity` holds the loaded identities; `cache` decides when to
//! sign; `socket`, `peer` and `server` serve gRPC; `sink` keeps token
//! files current; `proxy` forwards HTTP requests to Skykit API with a
//! token attached; `client` reaches the agent. This library exists so
//! `main` and the tests share code; it is not a public API.

#![deny(unsafe_code)]

pub mod cache;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod duration;
pub mod identity;
pub mod key;
pub mod limits;
pub mod memory;
pub mod metrics;
pub mod peer;
pub mod policy;
pub mod proto;
pub mod proxy;
pub mod server;
pub mod signal;
pub mod sink;
pub mod socket;
pub mod status;
pub mod systemd;
pub mod token;
