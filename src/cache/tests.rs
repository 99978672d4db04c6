//! Cache tests on paused tokio time with an injected wall clock and a
//! signer that counts its calls, can be held, and can be made to fail.

use std::sync::{
    Arc, Condvar, Mutex,
    atomic::{AtomicBool, AtomicUsize, Ordering},
};

use super::*;

const START: Duration = Duration::from_secs(1_700_000_000);

/// Wall time follows tokio's (paused) clock plus a step tests can change.
struct TestClock {
    start: Instant,
    step_secs: Mutex<i64>,
}

impl TestClock {
    fn new() -> Arc<Self> {
        Arc::new(TestClock {
            start: Instant::now(),
            step_secs: Mutex::new(0),
        })
    }

    /// Steps the wall clock (only) by `seconds`, as an NTP jump would.
    fn step(&self, seconds: i64) {
        *self.step_secs.lock().unwrap() += seconds;
    }
}

impl Clock for Arc<TestClock> {
    fn wall(&self) -> Duration {
        let elapsed = START + Instant::now().duration_since(self.start);
        let step = *self.step_secs.lock().unwrap();
        if step >= 0 {
            elapsed + Duration::from_secs(step as u64)
        } else {
            elapsed - Duration::from_secs(step.unsigned_abs())
        }
    }

    fn mono(&self) -> Instant {
        Instant::now()
    }
}

/// A gate a signing thread waits at until the test opens it.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    fn wait(&self) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

/// Signs fake tokens whose text names the identity, `iat` and call number.
#[derive(Default)]
struct TestSigner {
    calls: AtomicUsize,
    failing: AtomicBool,
    /// Signing for identity "slow" waits here.
    gate: Gate,
}

impl TestSigner {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Signer for TestSigner {
    fn sign(
        &self,
        identity: &str,
        lifetime: Lifetime,
        issued_at: u64,
    ) -> Result<Token, SignFailure> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if identity == "slow" {
            self.gate.wait();
        }
        if self.failing.load(Ordering::SeqCst) {
            return Err(SignFailure("test signer told to fail".into()));
        }
        Ok(Token {
            jws: format!("{identity}.{issued_at}.{call}").into(),
            issuer: "test@example.com".into(),
            issued_at,
            expires_at: issued_at + u64::from(lifetime.secs()),
            key_id: "test-key".into(),
        })
    }
}

type TestCache = Cache<Arc<TestSigner>, Arc<TestClock>>;

fn setup() -> (TestCache, Arc<TestSigner>, Arc<TestClock>) {
    let signer = Arc::new(TestSigner::default());
    let clock = TestClock::new();
    (Cache::new(signer.clone(), clock.clone()), signer, clock)
}

fn key(identity: &str, seconds: i64) -> Key {
    Key {
        identity: identity.into(),
        lifetime: Lifetime::from_secs(seconds).unwrap(),
    }
}

const CALLER: Peer = Peer {
    uid: 1000,
    gid: 1000,
    pid: Some(42),
};

async fn get(cache: &TestCache, key: &Key) -> Issued {
    cache.get(key, Duration::ZERO, CALLER).await.unwrap()
}

/// Lets every runnable task (and finished blocking work) make progress.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// Waits for a background signature to land in the entry.
async fn until_signed(signer: &TestSigner, calls: usize) {
    while signer.calls() < calls {
        settle().await;
    }
    settle().await;
    tokio::time::sleep(Duration::from_millis(1)).await;
}

#[tokio::test(start_paused = true)]
async fn second_call_is_served_from_cache() {
    let (cache, signer, _) = setup();
    let key = key("default", 3600);
    let first = get(&cache, &key).await;
    let second = get(&cache, &key).await;
    assert!(first.fresh);
    assert!(!second.fresh);
    assert_eq!(first.token.jws, second.token.jws);
    assert_eq!(signer.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn concurrent_misses_share_one_signature() {
    let (cache, signer, _) = setup();
    let key = key("slow", 3600);
    let waiters: Vec<_> = (0..16)
        .map(|_| {
            let cache = cache.clone();
            let key = key.clone();
            tokio::spawn(async move { get(&cache, &key).await })
        })
        .collect();
    settle().await;
    signer.gate.open();
    let mut tokens = Vec::new();
    for waiter in waiters {
        tokens.push(waiter.await.unwrap().token.jws.clone());
    }
    assert_eq!(signer.calls(), 1);
    assert!(tokens.iter().all(|token| *token == tokens[0]));
}

#[tokio::test(start_paused = true)]
async fn a_cache_hit_completes_while_another_signature_is_blocked() {
    let (cache, signer, _) = setup();
    let fast = key("fast", 3600);
    let cached = get(&cache, &fast).await;
    let slow = {
        let cache = cache.clone();
        tokio::spawn(async move { get(&cache, &key("slow", 3600)).await })
    };
    until_signed_started(&signer, 2).await;
    // The slow signature holds a blocking thread; the hit must not wait for it.
    let hit = get(&cache, &fast).await;
    assert_eq!(hit.token.jws, cached.token.jws);
    assert!(!slow.is_finished());
    signer.gate.open();
    assert!(slow.await.unwrap().fresh);
}

async fn until_signed_started(signer: &TestSigner, calls: usize) {
    while signer.calls() < calls {
        settle().await;
        std::thread::yield_now();
    }
}

#[tokio::test(start_paused = true)]
async fn refresh_after_is_between_45_and_55_percent_of_the_lifetime() {
    for _ in 0..50 {
        let (cache, _, _) = setup();
        let issued = get(&cache, &key("default", 1000)).await;
        let issued_at = Duration::from_secs(issued.token.issued_at);
        let offset = issued.refresh_after - issued_at;
        assert!(
            (Duration::from_secs(450)..=Duration::from_secs(550)).contains(&offset),
            "{offset:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_first_call_after_refresh_after_starts_one_background_resign() {
    let (cache, signer, _) = setup();
    let key = key("default", 1000);
    let first = get(&cache, &key).await;
    let refresh_in = first.refresh_after - Duration::from_secs(first.token.issued_at);
    tokio::time::advance(refresh_in - Duration::from_secs(1)).await;
    assert_eq!(get(&cache, &key).await.token.jws, first.token.jws);
    assert_eq!(signer.calls(), 1, "no re-sign before refresh_after");

    tokio::time::advance(Duration::from_secs(2)).await;
    // Past refresh_after: the caller still gets the current token at once...
    let during = get(&cache, &key).await;
    assert_eq!(during.token.jws, first.token.jws);
    assert!(!during.fresh);
    // ...and more calls meanwhile do not start more signatures.
    get(&cache, &key).await;
    until_signed(&signer, 2).await;
    assert_eq!(signer.calls(), 2);
    let after = get(&cache, &key).await;
    assert_ne!(after.token.jws, first.token.jws);
    assert!(after.token.issued_at > first.token.issued_at);
    assert_eq!(signer.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn unmet_min_valid_for_signs_a_new_token_that_replaces_the_entry() {
    let (cache, signer, _) = setup();
    let key = key("default", 600);
    let first = get(&cache, &key).await;
    tokio::time::advance(Duration::from_secs(10)).await;
    // 590 s are left; asking for 595 s forces a new signature.
    let forced = cache
        .get(&key, Duration::from_secs(595), CALLER)
        .await
        .unwrap();
    assert!(forced.fresh);
    assert_eq!(forced.token.issued_at, first.token.issued_at + 10);
    let next = get(&cache, &key).await;
    assert_eq!(
        next.token.jws, forced.token.jws,
        "the new token replaced the entry"
    );
    // A min_valid_for the cached token meets does not sign.
    cache
        .get(&key, Duration::from_secs(500), CALLER)
        .await
        .unwrap();
    assert_eq!(signer.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_token_is_not_served_in_its_last_tenth() {
    let (cache, signer, _) = setup();
    let key = key("default", 600);
    let first = get(&cache, &key).await;
    signer.failing.store(true, Ordering::SeqCst);
    // 541 s in, 59 s (under a tenth of 600 s) remain: not servable.
    tokio::time::advance(Duration::from_secs(541)).await;
    let error = cache.get(&key, Duration::ZERO, CALLER).await.unwrap_err();
    assert!(error.to_string().contains("signing failed"), "{error}");
    signer.failing.store(false, Ordering::SeqCst);
    let next = get(&cache, &key).await;
    assert!(next.token.issued_at > first.token.issued_at);
}

#[tokio::test(start_paused = true)]
async fn failed_resign_keeps_serving_and_retries_soon() {
    let (cache, signer, clock) = setup();
    let key = key("default", 1000);
    let first = get(&cache, &key).await;
    signer.failing.store(true, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(560)).await;
    assert_eq!(get(&cache, &key).await.token.jws, first.token.jws);
    until_signed(&signer, 2).await;
    // The failure is absorbed: the old token is served with a retry time of
    // now + min(30 s, remaining / 10) = now + 30 s (about 440 s remain).
    let served = get(&cache, &key).await;
    assert_eq!(served.token.jws, first.token.jws);
    let now = clock.wall();
    let retry_in = served.refresh_after.saturating_sub(now);
    assert!(
        retry_in > Duration::from_secs(29) && retry_in <= Duration::from_secs(30),
        "{retry_in:?}"
    );
    assert_eq!(signer.calls(), 2, "no retry before the retry time");
    signer.failing.store(false, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(31)).await;
    get(&cache, &key).await;
    until_signed(&signer, 3).await;
    assert_ne!(get(&cache, &key).await.token.jws, first.token.jws);
}

#[tokio::test(start_paused = true)]
async fn the_retry_delay_shrinks_with_the_remaining_time() {
    let (cache, signer, clock) = setup();
    let key = key("default", 600);
    get(&cache, &key).await;
    signer.failing.store(true, Ordering::SeqCst);
    // 400 s in, 200 s remain: the retry comes after 20 s, not 30 s.
    tokio::time::advance(Duration::from_secs(400)).await;
    get(&cache, &key).await;
    until_signed(&signer, 2).await;
    let served = get(&cache, &key).await;
    let retry_in = served.refresh_after.saturating_sub(clock.wall());
    assert!(
        retry_in > Duration::from_secs(19) && retry_in <= Duration::from_secs(20),
        "{retry_in:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn nothing_servable_and_signing_fails_is_unavailable() {
    let (cache, signer, _) = setup();
    signer.failing.store(true, Ordering::SeqCst);
    let error = cache
        .get(&key("default", 600), Duration::ZERO, CALLER)
        .await
        .unwrap_err();
    let Error::Unavailable { identity, reason } = error else {
        panic!("expected Unavailable, got {error:?}");
    };
    assert_eq!(&*identity, "default");
    assert!(reason.to_string().contains("told to fail"));
}

#[tokio::test(start_paused = true)]
async fn a_wall_clock_step_forward_never_serves_an_expired_token() {
    let (cache, _, clock) = setup();
    let key = key("default", 600);
    let first = get(&cache, &key).await;
    clock.step(3600);
    let after = get(&cache, &key).await;
    assert!(after.fresh, "expired by the wall clock: re-signed");
    assert_eq!(after.token.issued_at, first.token.issued_at + 3600);
}

#[tokio::test(start_paused = true)]
async fn a_wall_clock_step_back_never_serves_an_expired_token() {
    let (cache, _, clock) = setup();
    let key = key("default", 600);
    let first = get(&cache, &key).await;
    // 590 s pass, but the wall clock is stepped back by as much, so by the
    // wall clock the token looks fresh; the monotonic clock knows better.
    tokio::time::advance(Duration::from_secs(590)).await;
    clock.step(-590);
    let after = get(&cache, &key).await;
    assert!(after.fresh, "expired by the monotonic clock: re-signed");
    assert_eq!(after.token.issued_at, first.token.issued_at);
    assert_ne!(after.token.jws, first.token.jws);
}

#[tokio::test(start_paused = true)]
async fn a_token_from_the_future_is_not_served() {
    let (cache, _, clock) = setup();
    let key = key("default", 3600);
    let first = get(&cache, &key).await;
    clock.step(-3600);
    let after = get(&cache, &key).await;
    assert!(after.fresh);
    assert_eq!(after.token.issued_at, first.token.issued_at - 3600);
    assert_eq!(after.token.expires_at - after.token.issued_at, 3600);
}

#[tokio::test(start_paused = true)]
async fn entries_unused_for_a_lifetime_are_evicted() {
    let (cache, _, _) = setup();
    get(&cache, &key("default", 60)).await;
    get(&cache, &key("default", 3600)).await;
    tokio::time::advance(Duration::from_secs(61)).await;
    cache.sweep();
    assert_eq!(cache.len(), 1, "the 60 s entry went, the 1 h entry stays");
    tokio::time::advance(Duration::from_secs(3600)).await;
    cache.sweep();
    assert!(cache.is_empty());
}

#[tokio::test(start_paused = true)]
async fn each_identity_keeps_at_most_64_entries_evicting_the_least_recently_used() {
    let (cache, signer, _) = setup();
    for seconds in 60..60 + MAX_ENTRIES_PER_IDENTITY as i64 {
        get(&cache, &key("default", seconds)).await;
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    get(&cache, &key("other", 600)).await;
    // Touch the oldest so the second oldest becomes least recently used.
    get(&cache, &key("default", 60)).await;
    let calls = signer.calls();
    get(&cache, &key("default", 1000)).await;
    assert_eq!(cache.len(), MAX_ENTRIES_PER_IDENTITY + 1);
    get(&cache, &key("default", 60)).await;
    assert_eq!(
        signer.calls(),
        calls + 1,
        "the recently used entry survived"
    );
    get(&cache, &key("default", 61)).await;
    assert_eq!(
        signer.calls(),
        calls + 2,
        "the least recently used entry was evicted"
    );
    get(&cache, &key("other", 600)).await;
    assert_eq!(signer.calls(), calls + 2, "other identities are untouched");
}

#[tokio::test(start_paused = true)]
async fn forget_empties_only_that_identity() {
    let (cache, signer, _) = setup();
    get(&cache, &key("a", 600)).await;
    get(&cache, &key("b", 600)).await;
    cache.forget("a");
    assert_eq!(cache.snapshot().len(), 1, "only b still holds a token");
    assert!(get(&cache, &key("a", 600)).await.fresh);
    assert!(!get(&cache, &key("b", 600)).await.fresh);
    assert_eq!(signer.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn re_signing_after_forget_or_expiry_is_not_charged_to_the_caller() {
    let (cache, _, _) = setup();
    let key = key("default", 600);
    let refuse = || false;
    get(&cache, &key).await;
    cache.forget("default");
    assert!(
        cache
            .get_within(&key, Duration::ZERO, CALLER, &refuse)
            .await
            .is_ok()
    );
    tokio::time::advance(Duration::from_secs(600)).await;
    assert!(
        cache
            .get_within(&key, Duration::ZERO, CALLER, &refuse)
            .await
            .is_ok()
    );
}

#[tokio::test(start_paused = true)]
async fn only_requests_that_start_a_signature_spend_the_budget() {
    let (cache, signer, _) = setup();
    let key = key("default", 600);
    let refuse = || false;
    let error = cache
        .get_within(&key, Duration::ZERO, CALLER, &refuse)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Throttled { uid: 1000 }), "{error:?}");
    assert_eq!(signer.calls(), 0);
    get(&cache, &key).await;
    // A hit costs nothing, even for a caller with no budget left.
    let hit = cache
        .get_within(&key, Duration::ZERO, CALLER, &refuse)
        .await
        .unwrap();
    assert!(!hit.fresh);
    // Forcing a new signature with min_valid_for does cost.
    tokio::time::advance(Duration::from_secs(10)).await;
    let forced = cache
        .get_within(&key, Duration::from_secs(595), CALLER, &refuse)
        .await;
    assert!(matches!(forced, Err(Error::Throttled { .. })));
}

#[tokio::test(start_paused = true)]
async fn a_signature_in_flight_when_its_identity_is_forgotten_is_not_cached() {
    let (cache, signer, _) = setup();
    let key = key("slow", 600);
    let waiter = {
        let cache = cache.clone();
        let key = key.clone();
        tokio::spawn(async move { get(&cache, &key).await })
    };
    until_signed_started(&signer, 1).await;
    cache.forget("slow");
    signer.gate.open();
    let served = waiter.await.unwrap();
    assert!(served.fresh, "the waiter still gets its token");
    settle().await;
    let next = get(&cache, &key).await;
    assert!(
        next.fresh,
        "but it was not cached: the next call signs anew"
    );
    assert_eq!(signer.calls(), 2);
}

/// The next token published to a subscriber.
async fn next_published(updates: &mut watch::Receiver<Option<Issued>>) -> Issued {
    updates.changed().await.expect("the publisher lives");
    updates.borrow_and_update().clone().expect("a token")
}

#[tokio::test(start_paused = true)]
async fn a_watched_entry_is_resigned_by_a_timer_at_refresh_after() {
    let (cache, signer, clock) = setup();
    let key = key("default", 1000);
    let mut updates = cache.subscribe(&key, CALLER);
    let first = get(&cache, &key).await;
    let published_first = next_published(&mut updates).await;
    assert_eq!(published_first.token.jws, first.token.jws);
    // No request comes; the timer alone re-signs at refresh_after.
    let next = next_published(&mut updates).await;
    assert!(next.token.issued_at > first.token.issued_at);
    let now = clock.wall();
    assert!(now >= first.refresh_after && now < first.refresh_after + Duration::from_secs(2));
    assert_eq!(signer.calls(), 2);
    // And the cache serves the replacement to ordinary callers too.
    assert_eq!(get(&cache, &key).await.token.jws, next.token.jws);
}

#[tokio::test(start_paused = true)]
async fn several_watchers_share_one_signature_per_refresh() {
    let (cache, signer, _) = setup();
    let key = key("default", 600);
    let mut watchers: Vec<_> = (0..5).map(|_| cache.subscribe(&key, CALLER)).collect();
    get(&cache, &key).await;
    for updates in &mut watchers {
        next_published(updates).await;
    }
    let mut seen = Vec::new();
    for updates in &mut watchers {
        seen.push(next_published(updates).await.token.jws.clone());
    }
    assert!(seen.iter().all(|jws| *jws == seen[0]));
    assert_eq!(
        signer.calls(),
        2,
        "one signature at start, one at the refresh"
    );
    assert_eq!(cache.watchers(), 5);
    assert_eq!(cache.refreshers(), 1);
}

#[tokio::test(start_paused = true)]
async fn forgetting_a_watched_identity_pushes_a_new_token_at_once() {
    let (cache, signer, _) = setup();
    let key = key("default", 3600);
    let mut updates = cache.subscribe(&key, CALLER);
    let first = get(&cache, &key).await;
    next_published(&mut updates).await;
    tokio::time::advance(Duration::from_secs(1)).await;
    cache.forget("default");
    let pushed = next_published(&mut updates).await;
    assert_ne!(pushed.token.jws, first.token.jws);
    assert_eq!(signer.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn when_the_last_watcher_leaves_its_refresher_stops_and_the_entry_can_go() {
    let (cache, signer, _) = setup();
    let key = key("default", 60);
    let updates = cache.subscribe(&key, CALLER);
    get(&cache, &key).await;
    assert_eq!(cache.refreshers(), 1);
    drop(updates);
    settle().await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(cache.refreshers(), 0);
    assert_eq!(cache.watchers(), 0);
    // Request-driven again: no timer signs it, and it is evicted when unused.
    tokio::time::advance(Duration::from_secs(61)).await;
    settle().await;
    assert_eq!(signer.calls(), 1);
    cache.sweep();
    assert!(cache.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_watched_entry_is_never_evicted() {
    let (cache, _, _) = setup();
    let key = key("default", 60);
    let mut updates = cache.subscribe(&key, CALLER);
    get(&cache, &key).await;
    next_published(&mut updates).await;
    tokio::time::advance(Duration::from_secs(200)).await;
    cache.sweep();
    assert_eq!(cache.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_watched_entry_without_a_token_is_signed_again_with_backoff() {
    let (cache, signer, _) = setup();
    let key = key("default", 600);
    let mut updates = cache.subscribe(&key, CALLER);
    signer.failing.store(true, Ordering::SeqCst);
    assert!(cache.get(&key, Duration::ZERO, CALLER).await.is_err());
    // The refresher keeps trying, each time after a longer pause...
    tokio::time::sleep(Duration::from_secs(8)).await;
    let attempts = signer.calls();
    assert!((3..=5).contains(&attempts), "{attempts} attempts in 8 s");
    // ...and the first success reaches the watchers without any request.
    signer.failing.store(false, Ordering::SeqCst);
    let pushed = tokio::time::timeout(Duration::from_secs(120), next_published(&mut updates))
        .await
        .expect("a token arrives once signing works again");
    assert_eq!(pushed.token.lifetime(), Duration::from_secs(600));
}

/// The lock-free path, as the server tries it before [`Cache::get_within`].
fn hit(cache: &TestCache, key: &Key, min_valid_for: Duration) -> Option<String> {
    cache.cached(&key.identity, key.lifetime, min_valid_for, |token, _| {
        token.jws.to_string()
    })
}

#[tokio::test(start_paused = true)]
async fn the_lock_free_path_serves_only_what_the_cache_would_serve() {
    let (cache, signer, _) = setup();
    let default = key("default", 1000);
    assert_eq!(
        hit(&cache, &default, Duration::ZERO),
        None,
        "nothing signed yet"
    );
    let first = get(&cache, &default).await;
    assert_eq!(
        hit(&cache, &default, Duration::ZERO).as_deref(),
        Some(&*first.token.jws)
    );
    assert_eq!(
        hit(&cache, &key("default", 999), Duration::ZERO),
        None,
        "another lifetime"
    );
    assert_eq!(
        hit(&cache, &key("other", 1000), Duration::ZERO),
        None,
        "another identity"
    );
    assert_eq!(
        hit(&cache, &default, Duration::from_secs(1001)),
        None,
        "a min_valid_for the token cannot meet"
    );
    // refresh_after is at 450 to 550 s: from then on calls take the slow
    // path, which starts the re-sign.
    tokio::time::advance(Duration::from_secs(550)).await;
    assert_eq!(
        hit(&cache, &default, Duration::ZERO),
        None,
        "due for a refresh"
    );
    assert_eq!(get(&cache, &default).await.token.jws, first.token.jws);
    until_signed(&signer, 2).await;
    let second = hit(&cache, &default, Duration::ZERO).expect("the new token is published");
    assert_ne!(second, *first.token.jws);
}

#[tokio::test(start_paused = true)]
async fn forgetting_or_removing_an_identity_unpublishes_its_tokens_at_once() {
    let (cache, _, _) = setup();
    let (a, b, c) = (key("a", 600), key("b", 600), key("c", 600));
    for key in [&a, &b, &c] {
        get(&cache, key).await;
    }
    cache.forget("a");
    assert_eq!(hit(&cache, &a, Duration::ZERO), None, "a forgotten key");
    assert!(hit(&cache, &b, Duration::ZERO).is_some());
    cache.remove("b");
    assert_eq!(hit(&cache, &b, Duration::ZERO), None, "a removed identity");
    assert!(hit(&cache, &c, Duration::ZERO).is_some());
}

#[tokio::test(start_paused = true)]
async fn a_token_served_by_the_lock_free_path_counts_as_used() {
    let (cache, _, _) = setup();
    let used = key("used", 100);
    let unused = key("unused", 100);
    get(&cache, &used).await;
    get(&cache, &unused).await;
    // Before refresh_after (45 s at the earliest) only the lock-free path
    // sees the call.
    tokio::time::advance(Duration::from_secs(40)).await;
    assert!(hit(&cache, &used, Duration::ZERO).is_some());
    tokio::time::advance(Duration::from_secs(70)).await;
    cache.sweep();
    assert_eq!(cache.len(), 1, "unused for 110 s of its 100: evicted");
    assert!(
        cache
            .snapshot()
            .iter()
            .all(|entry| &*entry.identity == "used")
    );
    tokio::time::advance(Duration::from_secs(31)).await;
    cache.sweep();
    assert!(cache.is_empty(), "unused for 101 s since it was served");
}

#[tokio::test(start_paused = true)]
async fn after_a_failed_resign_the_lock_free_path_serves_the_old_token_until_the_retry() {
    let (cache, signer, _) = setup();
    let key = key("default", 1000);
    let first = get(&cache, &key).await;
    signer.failing.store(true, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(560)).await;
    assert_eq!(hit(&cache, &key, Duration::ZERO), None, "due for a refresh");
    get(&cache, &key).await;
    until_signed(&signer, 2).await;
    // The retry is 30 s away (about 440 s remain): served without a lock
    // until then.
    assert_eq!(
        hit(&cache, &key, Duration::ZERO).as_deref(),
        Some(&*first.token.jws)
    );
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(hit(&cache, &key, Duration::ZERO), None, "the retry is due");
}

#[tokio::test(start_paused = true)]
async fn uses_on_the_lock_free_path_survive_a_forget() {
    let (cache, _, _) = setup();
    let key = key("a", 100);
    get(&cache, &key).await;
    tokio::time::advance(Duration::from_secs(40)).await;
    assert!(hit(&cache, &key, Duration::ZERO).is_some());
    tokio::time::advance(Duration::from_secs(1)).await;
    cache.forget("a");
    // 101 s after the signature, 61 s after the last use.
    tokio::time::advance(Duration::from_secs(60)).await;
    cache.sweep();
    assert_eq!(
        cache.len(),
        1,
        "the emptied entry stays: it was used 61 s ago"
    );
    let refuse = || false;
    assert!(
        cache
            .get_within(&key, Duration::ZERO, CALLER, &refuse)
            .await
            .is_ok(),
        "re-signing a forgotten entry is the agent's cost, not the caller's"
    );
}

#[tokio::test(start_paused = true)]
async fn uses_on_the_lock_free_path_survive_a_background_resign() {
    let (cache, signer, _) = setup();
    let key = key("a", 100);
    get(&cache, &key).await;
    let updates = cache.subscribe(&key, CALLER);
    tokio::time::advance(Duration::from_secs(40)).await;
    assert!(hit(&cache, &key, Duration::ZERO).is_some());
    // The watch's refresher re-signs at 45 to 55 s.
    tokio::time::sleep(Duration::from_secs(20)).await;
    until_signed(&signer, 2).await;
    drop(updates);
    settle().await;
    tokio::time::advance(Duration::from_secs(41)).await;
    cache.sweep();
    assert_eq!(cache.len(), 1, "used about 61 s ago: it stays");
}

#[tokio::test(start_paused = true)]
async fn the_lock_free_path_never_serves_what_the_monotonic_clock_says_expired() {
    let (cache, _, clock) = setup();
    let key = key("a", 100);
    get(&cache, &key).await;
    clock.step(-1000);
    tokio::time::advance(Duration::from_secs(95)).await;
    assert_eq!(hit(&cache, &key, Duration::ZERO), None, "in its last tenth");
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(hit(&cache, &key, Duration::ZERO), None, "expired");
}

#[tokio::test(start_paused = true)]
async fn uses_on_the_lock_free_path_count_for_least_recently_used_eviction() {
    let (cache, signer, _) = setup();
    for seconds in 100..100 + MAX_ENTRIES_PER_IDENTITY as i64 {
        get(&cache, &key("default", seconds)).await;
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    tokio::time::advance(Duration::from_secs(2)).await;
    // The oldest is used again, on the lock-free path only.
    assert!(hit(&cache, &key("default", 100), Duration::ZERO).is_some());
    get(&cache, &key("default", 1000)).await;
    let calls = signer.calls();
    assert!(
        hit(&cache, &key("default", 100), Duration::ZERO).is_some(),
        "the entry used last survived"
    );
    assert_eq!(
        hit(&cache, &key("default", 101), Duration::ZERO),
        None,
        "the least recently used entry was evicted and unpublished"
    );
    assert_eq!(signer.calls(), calls);
}
