//! 20,000 connect / call / disconnect cycles: every connection the agent
//! accepted is closed again, with its descriptor, task and memory.

use std::{
    ops::Range,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tonic::transport::Channel;

use crate::harness::{self, Agent, Dir};

const CYCLES: u64 = 20_000;
/// RSS is first read once this many cycles have finished.
const EARLY: u64 = 2_000;
/// Cycles run by this many callers side by side.
const PARALLEL: usize = 4;
/// The open descriptors may differ from the start by at most this.
const FD_SLACK: usize = 2;
/// The whole run stops (and fails) after this, however far it got.
const TIME_LIMIT: Duration = Duration::from_secs(300);

#[test]
fn connect_call_disconnect_cycles_leak_no_descriptor_connection_or_memory() {
    let _serial = harness::serial();
    let dir = Dir::new();
    let key = dir.keygen("key");
    let mut agent = dir.serve(&key.private);
    harness::runtime().block_on(async {
        // The test's own connection, kept open to ask for the status; one
        // call first, so the token is cached and the signing pool started.
        let own = harness::connect(&agent.socket).await;
        harness::tokens(&own)
            .get_token(harness::request())
            .await
            .expect("the first GetToken");
        // The readiness probe's connection closes asynchronously.
        settled(&agent, &own, None).await;
        let start_fds = agent.open_fds();

        let deadline = Instant::now() + TIME_LIMIT;
        let started = Instant::now();
        let early = run(&agent.socket, 0..EARLY, deadline).await;
        early.assert_all_made(&agent);
        let early_fds = settled(&agent, &own, Some(start_fds)).await;
        let rss_early = agent.rss_kib();
        let rest = run(&agent.socket, EARLY..CYCLES, deadline).await;
        rest.assert_all_made(&agent);
        let elapsed = started.elapsed();
        let final_fds = settled(&agent, &own, Some(start_fds)).await;
        let rss_final = agent.rss_kib();
        agent.assert_running();
        println!(
            "soak: {CYCLES} connect/call/disconnect cycles, {PARALLEL} at a time: {:.1} s, {:.0} cycles/s; agent descriptors {start_fds} at the start, {early_fds} after {EARLY}, {final_fds} after {CYCLES}; RSS {rss_early} KiB after {EARLY}, {rss_final} KiB after {CYCLES}",
            elapsed.as_secs_f64(),
            harness::rate(CYCLES, elapsed),
        );

        // Both readings are taken with only the test's own connection open.
        harness::assert_rss_within_10_percent(rss_early, rss_final, "20,000 connections");
    });
}

/// Waits until the agent has only the test's own connection open and no
/// call but the status call in progress, and (given `start_fds`) its
/// descriptors are back within [`FD_SLACK`] of that; returns the count.
async fn settled(agent: &Agent, own: &Channel, start_fds: Option<usize>) -> usize {
    harness::eventually(
        "the agent is back to the test's own connection and descriptors",
        || async move {
            let status = harness::status(own).await;
            let fds = agent.open_fds();
            let fds_back = start_fds.is_none_or(|start| fds.abs_diff(start) <= FD_SLACK);
            if status.open_connections == 1 && status.calls_in_progress == 1 && fds_back {
                Ok(fds)
            } else {
                Err(format!(
                    "open_connections {} (want 1), calls_in_progress {} (want 1), descriptors {fds} (start {start_fds:?}, within {FD_SLACK})",
                    status.open_connections, status.calls_in_progress
                ))
            }
        },
    )
    .await
}

struct Outcome {
    planned: u64,
    done: u64,
    errors: u64,
    first_errors: Vec<String>,
}

impl Outcome {
    fn assert_all_made(&self, agent: &Agent) {
        assert!(
            self.errors == 0 && self.done == self.planned,
            "{} of {} cycles failed, {} were not made within {TIME_LIMIT:?}; first errors:\n{}\n--- agent stderr ---\n{}",
            self.errors,
            self.planned,
            self.planned - self.done,
            self.first_errors.join("\n"),
            agent.stderr()
        );
    }
}

/// Runs the cycles numbered `cycles`, [`PARALLEL`] at a time: each opens
/// its own connection, makes one call and drops the connection.
async fn run(socket: &Path, cycles: Range<u64>, deadline: Instant) -> Outcome {
    let next = Arc::new(AtomicU64::new(cycles.start));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_errors = Arc::new(Mutex::new(Vec::new()));
    let mut callers = Vec::new();
    for _ in 0..PARALLEL {
        let socket = socket.to_owned();
        let (next, done, errors) = (next.clone(), done.clone(), errors.clone());
        let first_errors = first_errors.clone();
        let end = cycles.end;
        callers.push(tokio::spawn(async move {
            loop {
                let cycle = next.fetch_add(1, Ordering::Relaxed);
                if cycle >= end || Instant::now() > deadline {
                    return;
                }
                let result = cycle_once(&socket).await;
                done.fetch_add(1, Ordering::Relaxed);
                if let Err(error) = result {
                    errors.fetch_add(1, Ordering::Relaxed);
                    let mut first = first_errors.lock().unwrap();
                    if first.len() < 5 {
                        first.push(format!("cycle {cycle}: {error}"));
                    }
                }
            }
        }));
    }
    for caller in callers {
        caller.await.expect("a caller task panicked");
    }
    Outcome {
        planned: cycles.end - cycles.start,
        done: done.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        first_errors: std::mem::take(&mut first_errors.lock().unwrap()),
    }
}

/// Connect, call, disconnect (dropping the only handle closes it).
async fn cycle_once(socket: &Path) -> Result<(), String> {
    let channel = skykit_agent::client::channel(socket)
        .await
        .map_err(|error| format!("connect: {error}"))?;
    let response = harness::tokens(&channel)
        .get_token(harness::request())
        .await
        .map_err(|status| format!("GetToken: {status:?}"))?;
    if response.get_ref().token.is_empty() {
        return Err("GetToken returned an empty token".to_owned());
    }
    Ok(())
}
