//! End-to-end tests: the real `skykit-agent` binary on a socket in a temp
//! dir, one module per feature; `support` holds the shared helpers.

mod bad_input;
mod config;
mod daemon;
mod faults;
mod keygen;
mod keys;
mod metrics;
mod proxy;
mod security;
mod serve;
mod signal;
mod sinks;
mod socket;
mod supply_chain;
mod support;
mod token;
mod units;
mod watch;
