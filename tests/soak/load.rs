//! 1,000,000 `GetToken` calls at 256 in flight over 8 connections, with
//! the default limits: not one error, and no memory growth.

use std::{
    ops::Range,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tonic::transport::Channel;

use crate::harness::{self, Agent, Dir, ISSUER};

const CALLS: u64 = 1_000_000;
/// RSS is first read once this many calls have finished.
const EARLY: u64 = 100_000;
const IN_FLIGHT: usize = 256;
const CONNECTIONS: usize = 8;
/// Every this many calls, the token is verified with the public key.
const SAMPLE_EVERY: u64 = 10_000;
/// The whole run stops (and fails) after this, however far it got.
const TIME_LIMIT: Duration = Duration::from_secs(300);

#[test]
fn a_million_calls_over_8_connections_all_succeed_and_memory_stays_flat() {
    let _serial = harness::serial();
    let dir = Dir::new();
    let key = dir.keygen("key");
    let mut agent = dir.serve(&key.private);
    harness::runtime().block_on(async {
        let mut channels = Vec::new();
        for _ in 0..CONNECTIONS {
            channels.push(harness::connect(&agent.socket).await);
        }
        let deadline = Instant::now() + TIME_LIMIT;
        let started = Instant::now();
        let early = run(&channels, 0..EARLY, deadline).await;
        early.assert_all_made(&agent);
        let early_elapsed = started.elapsed();
        let rss_early = agent.rss_kib();
        let rest = run(&channels, EARLY..CALLS, deadline).await;
        rest.assert_all_made(&agent);
        let elapsed = started.elapsed();
        let rss_final = agent.rss_kib();
        agent.assert_running();
        let status = harness::status(&channels[0]).await;
        println!(
            "soak: {CALLS} calls, {IN_FLIGHT} in flight over {CONNECTIONS} connections: {:.1} s, {:.0} calls/s (first {EARLY}: {:.0} calls/s); agent RSS {rss_early} KiB after {EARLY}, {rss_final} KiB after {CALLS}",
            elapsed.as_secs_f64(),
            harness::rate(CALLS, elapsed),
            harness::rate(EARLY, early_elapsed),
        );

        let samples: Vec<_> = early.samples.iter().chain(&rest.samples).collect();
        assert_eq!(samples.len() as u64, CALLS / SAMPLE_EVERY, "samples taken");
        for (call, sample) in samples {
            key.verifies(&sample.token).unwrap_or_else(|error| {
                panic!("the token of call {call} does not verify: {error}: {sample:?}")
            });
            assert_eq!(
                (sample.issuer.as_str(), sample.key_id.as_str()),
                (ISSUER, key.key_id.as_str()),
                "issuer and key_id of call {call}"
            );
        }
        assert_eq!(
            status.open_connections, CONNECTIONS as u32,
            "open connections after the run"
        );
        // Both readings are taken with the same 8 connections open and no
        // call in flight, so they compare like with like.
        harness::assert_rss_within_10_percent(rss_early, rss_final, "1,000,000 calls");
    });
}

/// What one phase of the run saw.
struct Outcome {
    planned: u64,
    done: u64,
    errors: u64,
    first_errors: Vec<String>,
    samples: Vec<(u64, Sample)>,
}

impl Outcome {
    fn assert_all_made(&self, agent: &Agent) {
        assert!(
            self.errors == 0 && self.done == self.planned,
            "{} of {} calls failed, {} were not made within {TIME_LIMIT:?}; first errors:\n{}\n--- agent stderr ---\n{}",
            self.errors,
            self.planned,
            self.planned - self.done,
            self.first_errors.join("\n"),
            agent.stderr()
        );
    }
}

#[derive(Debug)]
struct Sample {
    token: String,
    issuer: String,
    key_id: String,
}

/// Makes the calls numbered `calls` with [`IN_FLIGHT`] callers spread
/// over `channels`, and waits for all of them.
async fn run(channels: &[Channel], calls: Range<u64>, deadline: Instant) -> Outcome {
    let next = Arc::new(AtomicU64::new(calls.start));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_errors = Arc::new(Mutex::new(Vec::new()));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let mut callers = Vec::new();
    for caller in 0..IN_FLIGHT {
        let mut client = harness::tokens(&channels[caller % channels.len()]);
        let (next, done, errors) = (next.clone(), done.clone(), errors.clone());
        let (first_errors, samples) = (first_errors.clone(), samples.clone());
        let end = calls.end;
        callers.push(tokio::spawn(async move {
            loop {
                let call = next.fetch_add(1, Ordering::Relaxed);
                if call >= end || Instant::now() > deadline {
                    return;
                }
                let result = client.get_token(harness::request()).await;
                done.fetch_add(1, Ordering::Relaxed);
                match result {
                    Ok(response) if !response.get_ref().token.is_empty() => {
                        if call % SAMPLE_EVERY == 0 {
                            let response = response.into_inner();
                            samples.lock().unwrap().push((
                                call,
                                Sample {
                                    token: response.token,
                                    issuer: response.issuer,
                                    key_id: response.key_id,
                                },
                            ));
                        }
                    }
                    other => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        let mut first = first_errors.lock().unwrap();
                        if first.len() < 5 {
                            first.push(format!("call {call}: {other:?}"));
                        }
                    }
                }
            }
        }));
    }
    for caller in callers {
        caller.await.expect("a caller task panicked");
    }
    Outcome {
        planned: calls.end - calls.start,
        done: done.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        first_errors: std::mem::take(&mut first_errors.lock().unwrap()),
        samples: std::mem::take(&mut samples.lock().unwrap()),
    }
}
