//! Load and soak tests (issue 7, section 3): the real agent binary under
//! sustained load, checked for errors, leaked memory, leaked descriptors
//! and leaked connections.
//!
//! They run in a release build, as their own target, so that the counts
//! the issue fixes (1,000,000 calls, 20,000 connections, 100 reloads) fit
//! the test command's time:
//!
//! ```text
//! cargo test --release --locked --test soak
//! ```
//!
//! The target has `test = false` in Cargo.toml, so the debug
//! `cargo test --all-targets` does not run it: naming it with `--test soak`
//! does. The tests take one lock each (see [`harness::serial`]), because
//! each measures the agent's memory and the machine's throughput, which a
//! second test running beside it would disturb.

mod cycles;
mod harness;
mod load;
mod reload;
