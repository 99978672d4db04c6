//! 100 SIGHUP reloads, alternating two keys on disk, while 64 calls stay in
//! flight over 4 connections: not one call fails, and every token is
//! signed by exactly one of the two keys.

use std::{
    collections::HashMap,
    fs,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use rustix::process::Signal;
use tonic::transport::Channel;

use crate::harness::{self, Agent, Dir, ISSUER, Key};

const RELOADS: usize = 100;
const IN_FLIGHT: usize = 64;
const CONNECTIONS: usize = 4;
/// The load stops (and the test fails) after this, however far it got.
const TIME_LIMIT: Duration = Duration::from_secs(120);

#[test]
fn reloads_alternating_two_keys_under_load_fail_no_call() {
    let _serial = harness::serial();
    let dir = Dir::new();
    let keys = [dir.keygen("a"), dir.keygen("b")];
    let live = dir.join("live.pem");
    install(&keys[0].private, &live);
    let mut agent = dir.serve(&live);
    harness::runtime().block_on(async {
        let mut channels = Vec::new();
        for _ in 0..CONNECTIONS {
            channels.push(harness::connect(&agent.socket).await);
        }
        let own = harness::connect(&agent.socket).await;
        let load = Load::start(&channels, Instant::now() + TIME_LIMIT);

        // Each reload makes the cache forget the identity's token, so the
        // next call signs anew and is charged to the caller's signature
        // budget (120 per minute by default, all available at the start):
        // one signature per reload, plus the first, is 101. A reload waits
        // for the one before it to be reported, by which time that
        // signature (a millisecond) is long done, so none is made twice.
        let started = Instant::now();
        let mut calls_at_reload = Vec::with_capacity(RELOADS);
        for reload in 1..=RELOADS {
            let next = &keys[reload % 2];
            install(&next.private, &live);
            calls_at_reload.push(load.calls.load(Ordering::Relaxed));
            reload_and_wait(&agent, &own, next, reload).await;
        }
        let reloading = started.elapsed();
        let outcome = load.stop().await;
        agent.assert_running();
        println!(
            "soak: {RELOADS} reloads under {IN_FLIGHT} calls in flight over {CONNECTIONS} connections: {:.1} s ({:.0} ms a reload), {} calls ({:.0} calls/s), {} distinct tokens",
            reloading.as_secs_f64(),
            reloading.as_secs_f64() * 1000.0 / RELOADS as f64,
            outcome.calls,
            harness::rate(outcome.calls, reloading),
            outcome.tokens.len(),
        );

        assert!(
            outcome.errors == 0,
            "{} of {} calls failed; first errors:\n{}\n--- agent stderr ---\n{}",
            outcome.errors,
            outcome.calls,
            outcome.first_errors.join("\n"),
            agent.stderr()
        );
        assert!(
            calls_at_reload.windows(2).all(|pair| pair[0] < pair[1]),
            "calls completed between every two reloads (the load overlapped all of them): {calls_at_reload:?}"
        );
        let mut by_key = [0usize; 2];
        for (token, key_id) in &outcome.tokens {
            let verifying: Vec<usize> = (0..2)
                .filter(|&index| keys[index].verifies(token).is_ok())
                .collect();
            let [index] = verifying[..] else {
                panic!(
                    "a token verifies with {} of the two keys, not exactly one: {token}",
                    verifying.len()
                );
            };
            assert_eq!(
                key_id, &keys[index].key_id,
                "the key_id returned with a token is that of the key that signed it"
            );
            by_key[index] += 1;
        }
        assert!(
            by_key.iter().all(|&count| count > 0),
            "tokens of both keys were served: {by_key:?}"
        );
    });
}

/// Puts a copy of `key` at `live` in one step (rename), as an operator's
/// deployment tool would; the copy keeps the source's mode 0600.
fn install(key: &Path, live: &Path) {
    let staged = live.with_extension("new");
    fs::copy(key, &staged).expect("stage the key");
    fs::rename(&staged, live).expect("swap the key in");
}

/// Sends SIGHUP and waits until `GetStatus` reports a reload newer than the
/// one before, which succeeded and put `expected`'s key in place.
async fn reload_and_wait(agent: &Agent, own: &Channel, expected: &Key, number: usize) {
    let before = &harness::status(own).await.last_reload;
    agent.signal(Signal::HUP);
    harness::eventually(&format!("reload {number} finishes"), || async move {
        let status = harness::status(own).await;
        match status.last_reload {
            Some(reload) if Some(&reload) != before.as_ref() => {
                assert!(
                    reload.ok,
                    "reload {number} failed: {}\n--- agent stderr ---\n{}",
                    reload.error,
                    agent.stderr()
                );
                let key_id = status.identities.first().map(|identity| &identity.key_id);
                assert_eq!(
                    key_id,
                    Some(&expected.key_id),
                    "the key in use after reload {number}"
                );
                Ok(())
            }
            last => Err(format!("last reload {last:?}")),
        }
    })
    .await;
}

/// Callers that keep [`IN_FLIGHT`] calls going until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
    callers: Vec<tokio::task::JoinHandle<Seen>>,
}

/// What the callers saw.
#[derive(Default)]
struct Seen {
    calls: u64,
    errors: u64,
    first_errors: Vec<String>,
    /// Each distinct token, with the key_id returned with it.
    tokens: HashMap<String, String>,
}

impl Load {
    fn start(channels: &[Channel], deadline: Instant) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(AtomicU64::new(0));
        let first_errors = Arc::new(Mutex::new(Vec::new()));
        let callers = (0..IN_FLIGHT)
            .map(|caller| {
                let mut client = harness::tokens(&channels[caller % channels.len()]);
                let (stop, calls, first_errors) =
                    (stop.clone(), calls.clone(), first_errors.clone());
                tokio::spawn(async move {
                    let mut seen = Seen::default();
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let result = client.get_token(harness::request()).await;
                        seen.calls += 1;
                        calls.fetch_add(1, Ordering::Relaxed);
                        match result {
                            Ok(response)
                                if !response.get_ref().token.is_empty()
                                    && response.get_ref().issuer == ISSUER =>
                            {
                                let response = response.into_inner();
                                seen.tokens.entry(response.token).or_insert(response.key_id);
                            }
                            other => {
                                seen.errors += 1;
                                let mut first = first_errors.lock().unwrap();
                                if first.len() < 5 {
                                    first.push(format!("{other:?}"));
                                }
                            }
                        }
                    }
                    seen.first_errors = std::mem::take(&mut first_errors.lock().unwrap());
                    seen
                })
            })
            .collect();
        Load {
            stop,
            calls,
            callers,
        }
    }

    async fn stop(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Seen::default();
        for caller in self.callers {
            let seen = caller.await.expect("a caller task panicked");
            all.calls += seen.calls;
            all.errors += seen.errors;
            all.first_errors.extend(seen.first_errors);
            all.tokens.extend(seen.tokens);
        }
        all
    }
}
