//! The token cache: one entry per (identity, lifetime), refreshed in the
//! background about halfway through a token's life, with single-flight
//! signing on a blocking thread.
//!
//! The rules (later features rely on them):
//! - `refresh_after = iat + lifetime × u`, u uniform in [0.45, 0.55], so a
//!   fleet of agents does not re-sign in lockstep.
//! - A cached token is servable when `iat <= now + 5 s` and
//!   `exp - now >= max(min_valid_for, lifetime / 10)`, by the wall clock and
//!   again by the monotonic clock since signing, so a wall-clock step can
//!   never make the agent serve an expired token.
//! - The first request at or after `refresh_after` starts one background
//!   re-sign; callers keep getting the current token meanwhile.
//! - Requests that find nothing servable share one signature. A request
//!   whose `min_valid_for` the cached token cannot meet gets a token signed
//!   for it, which replaces the entry.
//! - An entry unused for one lifetime is evicted; each identity keeps at
//!   most [`MAX_ENTRIES_PER_IDENTITY`] (least recently used goes first).
//! - When re-signing fails the servable token keeps being served and is
//!   retried after `min(30 s, remaining / 10)`; with nothing servable the
//!   request fails with [`Error::Unavailable`].

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use tokio::{sync::watch, time::Instant};

use crate::{
    peer::Peer,
    token::{Lifetime, Token},
};

/// Each identity keeps at most this many lifetimes cached.
pub const MAX_ENTRIES_PER_IDENTITY: usize = 64;
/// How far in the future `iat` may lie before a token is not served.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5);
/// The longest wait before retrying a failed re-sign.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);
/// A watched entry without a token is signed again after this, doubling
/// up to [`MAX_NO_TOKEN_RETRY`] while signing keeps failing.
const NO_TOKEN_RETRY: Duration = Duration::from_secs(1);
const MAX_NO_TOKEN_RETRY: Duration = Duration::from_secs(60);

/// The two clocks the cache reads. Tests substitute both.
pub trait Clock: Send + Sync + 'static {
    /// Wall-clock time since the Unix epoch: what `iat` and `exp` count in.
    fn wall(&self) -> Duration;
    /// Monotonic time: tokio's, so tests can pause and advance it.
    fn mono(&self) -> Instant;
}

/// The real clocks.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn wall(&self) -> Duration {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
    }

    fn mono(&self) -> Instant {
        Instant::now()
    }
}

/// Makes tokens. Called on a blocking thread, never on the async reactor.
pub trait Signer: Send + Sync + 'static {
    fn sign(
        &self,
        identity: &str,
        lifetime: Lifetime,
        issued_at: u64,
    ) -> Result<Token, SignFailure>;
}

impl<T: Signer> Signer for Arc<T> {
    fn sign(
        &self,
        identity: &str,
        lifetime: Lifetime,
        issued_at: u64,
    ) -> Result<Token, SignFailure> {
        (**self).sign(identity, lifetime, issued_at)
    }
}

/// Why a signature could not be made; never carries key material.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct SignFailure(pub Arc<str>);

/// What a cache entry is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub identity: Arc<str>,
    pub lifetime: Lifetime,
}

/// A token handed to a caller.
#[derive(Debug, Clone)]
pub struct Issued {
    pub token: Arc<Token>,
    /// When a client caching this token should ask again, since the epoch.
    pub refresh_after: Duration,
    /// Signed for this request (or for one it joined), not served from cache.
    pub fresh: bool,
}

/// One cached token, as status reports show it (never the token itself).
#[derive(Debug, Clone)]
pub struct EntrySnapshot {
    pub identity: Arc<str>,
    pub lifetime: Lifetime,
    pub issued_at: u64,
    pub expires_at: u64,
    pub refresh_after: Duration,
}

/// A request the cache could not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error(
        "no token for identity {identity:?}: signing failed ({reason}) and no cached token is valid long enough"
    )]
    Unavailable {
        identity: Arc<str>,
        reason: SignFailure,
    },
    #[error(
        "uid {uid} has forced too many new signatures: reuse tokens (a fixed lifetime, no min_valid_for) or retry later"
    )]
    Throttled { uid: u32 },
}

/// The cache; cheap to clone (all clones share the entries).
pub struct Cache<S, C> {
    shared: Arc<Shared<S, C>>,
}

impl<S, C> Clone for Cache<S, C> {
    fn clone(&self) -> Self {
        Cache {
            shared: self.shared.clone(),
        }
    }
}

struct Shared<S, C> {
    signer: S,
    clock: C,
    entries: Mutex<HashMap<Key, Entry>>,
    /// Every entry's current token, republished under the `entries` lock
    /// whenever one changes, so [`Cache::cached`] answers a hit without
    /// taking that lock: on a busy agent the lock's cache line would
    /// otherwise bounce between the CPUs on every call.
    published: ArcSwap<Published>,
    /// What [`Cached::touched`] counts from.
    epoch: Instant,
    /// Bumped by [`Cache::forget`]: a signature that started before it
    /// may use a replaced key, so its token is not stored.
    generation: std::sync::atomic::AtomicU64,
    /// Refresher tasks of watched entries.
    refreshers: std::sync::atomic::AtomicUsize,
}

type Outcome = Result<Fresh, SignFailure>;

/// The current tokens by identity name, then lifetime: looked up by
/// `&str`, so a hit builds no [`Key`]. The names come from the config, not
/// from callers, so a fast hash needs no flooding resistance.
type Published = HashMap<Arc<str>, Vec<(Lifetime, Arc<Cached>)>, foldhash::fast::RandomState>;

#[derive(Clone)]
struct Fresh {
    token: Arc<Token>,
    refresh_after: Duration,
}

struct Entry {
    current: Option<Arc<Cached>>,
    /// The signature in flight for this entry, shared by everyone waiting.
    signing: Option<watch::Receiver<Option<Outcome>>>,
    last_used: Instant,
    /// Where each newly stored token is published while anyone watches;
    /// a refresher task re-signs the entry at `refresh_after` meanwhile.
    watchers: Option<Arc<watch::Sender<Option<Issued>>>>,
    /// Stops the refresher of a watched entry whose identity is removed.
    stop_refresher: Option<Arc<tokio::sync::Notify>>,
}

impl Entry {
    /// When the entry was last asked for, by either path.
    fn last_used(&self, epoch: Instant) -> Instant {
        let touched = self
            .current
            .as_ref()
            .map_or(0, |cached| cached.touched.load(Ordering::Relaxed));
        self.last_used.max(epoch + Duration::from_nanos(touched))
    }

    /// Drops the current token, keeping its lock-free uses in `last_used`.
    fn forget_token(&mut self, epoch: Instant) {
        self.last_used = self.last_used(epoch);
        self.current = None;
    }

    /// Replaces the current token, keeping the old one's lock-free uses.
    fn store(&mut self, cached: Cached, epoch: Instant) {
        self.last_used = self.last_used(epoch);
        self.current = Some(Arc::new(cached));
    }

    fn new(now: Instant) -> Self {
        Entry {
            current: None,
            signing: None,
            last_used: now,
            watchers: None,
            stop_refresher: None,
        }
    }

    fn is_watched(&self) -> bool {
        self.watchers
            .as_ref()
            .is_some_and(|watchers| watchers.receiver_count() > 0)
    }
}

struct Cached {
    token: Arc<Token>,
    /// The monotonic instant that corresponds to `iat`.
    mono_issued_at: Instant,
    refresh_after: Duration,
    /// When [`Cache::cached`] last served it, in nanoseconds since
    /// [`Shared::epoch`] (0: never), to the second: the lock-free path's
    /// share of [`Entry::last_used`].
    touched: AtomicU64,
}

impl Cached {
    /// How long the token stays valid, the lesser of the two clocks' views;
    /// `None` when it lies too far in the future or has expired.
    fn remaining(&self, now_wall: Duration, now_mono: Instant) -> Option<Duration> {
        let issued_at = Duration::from_secs(self.token.issued_at);
        if issued_at > now_wall + CLOCK_SKEW_ALLOWANCE {
            return None;
        }
        let by_wall = Duration::from_secs(self.token.expires_at).checked_sub(now_wall)?;
        let by_mono =
            (self.mono_issued_at + self.token.lifetime()).checked_duration_since(now_mono)?;
        Some(by_wall.min(by_mono))
    }

    fn servable(
        &self,
        lifetime: Lifetime,
        min_valid_for: Duration,
        now: (Duration, Instant),
    ) -> bool {
        let needed = min_valid_for.max(lifetime.duration() / 10);
        self.remaining(now.0, now.1)
            .is_some_and(|left| left >= needed)
    }

    /// Records a use at `now`. Only a change of a second or more is
    /// written, so the hot path mostly just reads this cache line.
    fn touch(&self, now: Instant, epoch: Instant) {
        let nanos = u64::try_from(now.saturating_duration_since(epoch).as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        if nanos.saturating_sub(self.touched.load(Ordering::Relaxed)) >= 1_000_000_000 {
            self.touched.store(nanos, Ordering::Relaxed);
        }
    }

    /// The same token with a later `refresh_after` (a failed re-sign's retry).
    fn retry_at(&self, refresh_after: Duration) -> Self {
        Cached {
            token: self.token.clone(),
            mono_issued_at: self.mono_issued_at,
            refresh_after,
            touched: AtomicU64::new(self.touched.load(Ordering::Relaxed)),
        }
    }
}

impl<S: Signer, C: Clock> Cache<S, C> {
    pub fn new(signer: S, clock: C) -> Self {
        let epoch = clock.mono();
        Cache {
            shared: Arc::new(Shared {
                signer,
                clock,
                entries: Mutex::new(HashMap::new()),
                published: ArcSwap::default(),
                epoch,
                generation: std::sync::atomic::AtomicU64::new(0),
                refreshers: std::sync::atomic::AtomicUsize::new(0),
            }),
        }
    }

    /// The hot path: `answer` applied to the cached token (and its
    /// `refresh_after`) of `identity` and `lifetime`, if it stays valid for
    /// `min_valid_for` and is not yet due for a refresh. It takes neither
    /// the entries' lock nor a reference to the token, and writes to the
    /// entry at most once a second; `None` sends the caller to
    /// [`Cache::get_within`], which decides everything else (misses,
    /// refreshes, budgets).
    pub fn cached<R>(
        &self,
        identity: &str,
        lifetime: Lifetime,
        min_valid_for: Duration,
        answer: impl FnOnce(&Token, Duration) -> R,
    ) -> Option<R> {
        let published = self.shared.published.load();
        let (_, cached) = published
            .get(identity)?
            .iter()
            .find(|(cached_for, _)| *cached_for == lifetime)?;
        let now = (self.shared.clock.wall(), self.shared.clock.mono());
        if now.0 >= cached.refresh_after || !cached.servable(lifetime, min_valid_for, now) {
            return None;
        }
        cached.touch(now.1, self.shared.epoch);
        Some(answer(&cached.token, cached.refresh_after))
    }

    /// A token for `key` that stays valid for at least `min_valid_for`.
    /// `caller` is named in the log line of any signature it triggers.
    pub async fn get(
        &self,
        key: &Key,
        min_valid_for: Duration,
        caller: Peer,
    ) -> Result<Issued, Error> {
        self.get_within(key, min_valid_for, caller, &|| true).await
    }

    /// Like [`Cache::get`], but a request that would start a new signature
    /// (not a background refresh, not one it can join) first asks
    /// `may_sign`, and fails with [`Error::Throttled`] if refused.
    pub async fn get_within(
        &self,
        key: &Key,
        min_valid_for: Duration,
        caller: Peer,
        may_sign: &(dyn Fn() -> bool + Sync),
    ) -> Result<Issued, Error> {
        let mut receiver = {
            let now = (self.shared.clock.wall(), self.shared.clock.mono());
            let mut entries = self.shared.lock();
            // The hit path hashes the key once and clones nothing; only a
            // new lifetime makes room and inserts.
            let new_lifetime = !entries.contains_key(key);
            if new_lifetime {
                self.make_room(&mut entries, &key.identity, now.1);
                entries.insert(key.clone(), Entry::new(now.1));
            }
            let Some(entry) = entries.get_mut(key) else {
                unreachable!("the entry was just inserted under the same lock");
            };
            entry.last_used = now.1;
            // The caller forces this signature (and pays from its budget)
            // with a new lifetime, or with a min_valid_for that a token
            // still good for everyone else cannot meet; an expired or
            // invalidated entry is re-signed at the agent's own cost.
            let forced = new_lifetime
                || entry
                    .current
                    .as_ref()
                    .is_some_and(|c| c.servable(key.lifetime, Duration::ZERO, now));
            if let Some(cached) = entry
                .current
                .as_ref()
                .filter(|c| c.servable(key.lifetime, min_valid_for, now))
            {
                let issued = Issued {
                    token: cached.token.clone(),
                    refresh_after: cached.refresh_after,
                    fresh: false,
                };
                if now.0 >= cached.refresh_after && entry.signing.is_none() {
                    entry.signing = Some(self.start_signing(key.clone(), caller));
                }
                return Ok(issued);
            }
            match &entry.signing {
                Some(signing) => signing.clone(),
                None if forced && !may_sign() => {
                    return Err(Error::Throttled { uid: caller.uid });
                }
                None => entry
                    .signing
                    .insert(self.start_signing(key.clone(), caller))
                    .clone(),
            }
        };
        let outcome = match receiver.wait_for(Option::is_some).await {
            Ok(outcome) => outcome
                .clone()
                .unwrap_or_else(|| Err(SignFailure("no outcome".into()))),
            Err(_) => Err(SignFailure(
                "the signing task ended without a result".into(),
            )),
        };
        outcome
            .map(|fresh| Issued {
                token: fresh.token,
                refresh_after: fresh.refresh_after,
                fresh: true,
            })
            .map_err(|reason| Error::Unavailable {
                identity: key.identity.clone(),
                reason,
            })
    }

    /// Drops entries unused for one lifetime. The server calls it now and then.
    pub fn sweep(&self) {
        let now = self.shared.clock.mono();
        let epoch = self.shared.epoch;
        let mut entries = self.shared.lock();
        entries.retain(|key, entry| !is_stale(key, entry, now, epoch));
        self.shared.publish(&entries);
    }

    /// Drops every entry of `identity`, e.g. after its key or issuer changed.
    /// Signatures still in flight complete for their callers, but their
    /// tokens are not cached.
    pub fn forget(&self, identity: &str) {
        let mut entries = self.shared.lock();
        // Under the lock, so a signature cannot finish between the bump and
        // the removal and slip its token in.
        self.shared
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // Entries stay (emptied), so their next signature is the agent's
        // doing, not charged to the caller; unused ones are swept as usual.
        let epoch = self.shared.epoch;
        for (key, entry) in entries.iter_mut() {
            if &*key.identity == identity {
                entry.forget_token(epoch);
            }
        }
        // Unpublished before anything else can fail, so no snapshot keeps
        // serving the forgotten key.
        self.shared.publish(&entries);
        for (key, entry) in entries.iter_mut() {
            if &*key.identity == identity && entry.is_watched() {
                // Watchers get a token from the new key right away.
                entry.signing = Some(self.start_signing(key.clone(), Peer::UNKNOWN));
            }
        }
    }

    /// Drops every entry of an identity that no longer exists. Its watchers'
    /// channels close (once their refreshers stop), which ends their streams.
    pub fn remove(&self, identity: &str) {
        let mut entries = self.shared.lock();
        self.shared
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        entries.retain(|key, entry| {
            let keep = &*key.identity != identity;
            if let (false, Some(stop)) = (keep, &entry.stop_refresher) {
                stop.notify_one();
            }
            keep
        });
        self.shared.publish(&entries);
    }

    /// Subscribes to every token stored for `key` from now on. While any
    /// subscriber is left, a background task re-signs the entry at its
    /// `refresh_after` (entries without subscribers stay request-driven).
    /// The current token is not sent: get it with [`Cache::get`] after
    /// subscribing, so none is missed in between.
    pub fn subscribe(&self, key: &Key, caller: Peer) -> watch::Receiver<Option<Issued>> {
        let now = self.shared.clock.mono();
        let mut entries = self.shared.lock();
        if !entries.contains_key(key) {
            self.make_room(&mut entries, &key.identity, now);
        }
        let entry = entries
            .entry(key.clone())
            .or_insert_with(|| Entry::new(now));
        entry.last_used = now;
        if let Some(watchers) = entry.watchers.as_ref().filter(|w| !w.is_closed()) {
            return watchers.subscribe();
        }
        let (sender, receiver) = watch::channel(None);
        let sender = Arc::new(sender);
        let stop = Arc::new(tokio::sync::Notify::new());
        entry.watchers = Some(sender.clone());
        entry.stop_refresher = Some(stop.clone());
        let cache = self.clone();
        let key = key.clone();
        self.shared
            .refreshers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::spawn(async move {
            cache
                .refresh_while_watched(&key, caller, &sender, &stop)
                .await;
            cache
                .shared
                .refreshers
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        });
        receiver
    }

    /// Subscribers across all entries.
    pub fn watchers(&self) -> usize {
        self.shared
            .lock()
            .values()
            .filter_map(|entry| entry.watchers.as_ref())
            .map(|watchers| watchers.receiver_count())
            .sum()
    }

    /// Background refresher tasks running (one per watched entry).
    pub fn refreshers(&self) -> usize {
        self.shared
            .refreshers
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Re-signs `key` at each `refresh_after` until its last subscriber
    /// leaves; then the entry goes back to being request-driven.
    async fn refresh_while_watched(
        &self,
        key: &Key,
        caller: Peer,
        watchers: &watch::Sender<Option<Issued>>,
        stop: &tokio::sync::Notify,
    ) {
        // While the entry has no token (its first is on the way, or signing
        // keeps failing), it is retried with a growing pause.
        let mut failures: u32 = 0;
        loop {
            let delay = match self.until_refresh(key) {
                Some(delay) => {
                    failures = 0;
                    delay
                }
                None => NO_TOKEN_RETRY
                    .saturating_mul(1 << failures.min(6))
                    .min(MAX_NO_TOKEN_RETRY),
            };
            tokio::select! {
                () = watchers.closed() => break,
                () = stop.notified() => break,
                () = tokio::time::sleep(delay) => {}
            }
            match self.until_refresh(key) {
                Some(due) if !due.is_zero() => continue,
                Some(_) => self.refresh_now(key, caller).await,
                None => {
                    self.refresh_now(key, caller).await;
                    failures += 1;
                }
            }
        }
        let mut entries = self.shared.lock();
        if let Some(entry) = entries.get_mut(key) {
            let ours = entry
                .watchers
                .as_ref()
                .is_some_and(|current| std::ptr::eq(current.as_ref(), watchers));
            if ours {
                entry.watchers = None;
            }
        }
    }

    /// How long until `key` is due for a refresh; `None` while it has no
    /// token.
    fn until_refresh(&self, key: &Key) -> Option<Duration> {
        let now = self.shared.clock.wall();
        self.shared
            .lock()
            .get(key)
            .and_then(|entry| entry.current.as_ref())
            .map(|cached| cached.refresh_after.saturating_sub(now))
    }

    /// Starts the due re-sign of `key` (or joins one in flight) and waits
    /// for it; failures are logged and rescheduled by `finish`.
    async fn refresh_now(&self, key: &Key, caller: Peer) {
        let mut receiver = {
            let now = self.shared.clock.mono();
            let mut entries = self.shared.lock();
            let entry = entries
                .entry(key.clone())
                .or_insert_with(|| Entry::new(now));
            entry
                .signing
                .get_or_insert_with(|| self.start_signing(key.clone(), caller))
                .clone()
        };
        let _ = receiver.wait_for(Option::is_some).await;
    }

    /// The entries holding a token, sorted by identity and lifetime.
    pub fn snapshot(&self) -> Vec<EntrySnapshot> {
        let mut entries: Vec<EntrySnapshot> = self
            .shared
            .lock()
            .iter()
            .filter_map(|(key, entry)| {
                entry.current.as_ref().map(|cached| EntrySnapshot {
                    identity: key.identity.clone(),
                    lifetime: key.lifetime,
                    issued_at: cached.token.issued_at,
                    expires_at: cached.token.expires_at,
                    refresh_after: cached.refresh_after,
                })
            })
            .collect();
        entries.sort_by(|a, b| (&a.identity, a.lifetime).cmp(&(&b.identity, b.lifetime)));
        entries
    }

    /// How many entries the cache holds.
    pub fn len(&self) -> usize {
        self.shared.lock().len()
    }

    /// Whether the cache holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes room for one more entry of `identity`: evicts its stale
    /// entries, then its least recently used one while it is at the cap.
    fn make_room(&self, entries: &mut HashMap<Key, Entry>, identity: &Arc<str>, now: Instant) {
        let epoch = self.shared.epoch;
        let before = entries.len();
        entries.retain(|key, entry| key.identity != *identity || !is_stale(key, entry, now, epoch));
        let count = entries
            .keys()
            .filter(|key| key.identity == *identity)
            .count();
        if count >= MAX_ENTRIES_PER_IDENTITY {
            let oldest = entries
                .iter()
                .filter(|(key, entry)| key.identity == *identity && !entry.is_watched())
                .min_by_key(|(_, entry)| entry.last_used(epoch))
                .map(|(key, _)| key.clone());
            if let Some(oldest) = oldest {
                entries.remove(&oldest);
            }
        }
        // Only evictions change what is published; a caller asking for new
        // lifetimes (perhaps refused by its budget) rebuilds nothing.
        if entries.len() != before {
            self.shared.publish(entries);
        }
    }

    /// Starts one signature for `key` in a task of its own, so it completes
    /// (and refreshes the entry) even if every caller waiting for it leaves.
    fn start_signing(&self, key: Key, caller: Peer) -> watch::Receiver<Option<Outcome>> {
        let (sender, receiver) = watch::channel(None);
        let shared = self.shared.clone();
        let generation = shared.generation.load(std::sync::atomic::Ordering::SeqCst);
        tokio::spawn(async move {
            let started_wall = shared.clock.wall();
            let started_mono = shared.clock.mono();
            let issued_at = started_wall.as_secs();
            let into_second = started_wall - Duration::from_secs(issued_at);
            let mono_issued_at = started_mono
                .checked_sub(into_second)
                .unwrap_or(started_mono);
            let signer = shared.clone();
            let signing_key = key.clone();
            let started = std::time::Instant::now();
            let result = tokio::task::spawn_blocking(move || {
                signer
                    .signer
                    .sign(&signing_key.identity, signing_key.lifetime, issued_at)
            })
            .await
            .unwrap_or_else(|_| Err(SignFailure("the signing thread panicked".into())));
            crate::metrics::observe_since(&crate::metrics::global().signing_seconds, started);
            let outcome = shared.finish(&key, caller, result, mono_issued_at, generation);
            sender.send_replace(Some(outcome));
        });
        receiver
    }
}

impl<S, C: Clock> Shared<S, C> {
    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Entry>> {
        // A panic while holding the lock cannot leave an entry half-written
        // (every update is a single assignment), and a publish it skipped
        // would leave only tokens current a moment before, never a
        // forgotten key's (`forget` publishes before anything else), so a
        // poisoned map is usable.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Republishes every current token for [`Cache::cached`]. Called, with
    /// the `entries` lock held, by everything that changes or drops a
    /// current token: a stale snapshot would keep serving a forgotten key.
    fn publish(&self, entries: &HashMap<Key, Entry>) {
        let mut published = Published::default();
        for (key, entry) in entries {
            if let Some(cached) = &entry.current {
                published
                    .entry(key.identity.clone())
                    .or_default()
                    .push((key.lifetime, cached.clone()));
            }
        }
        self.published.store(Arc::new(published));
    }

    /// Stores a finished signature, or on failure keeps the old token and
    /// schedules a retry.
    fn finish(
        &self,
        key: &Key,
        caller: Peer,
        result: Result<Token, SignFailure>,
        mono_issued_at: Instant,
        generation: u64,
    ) -> Outcome {
        let now_wall = self.clock.wall();
        let now_mono = self.clock.mono();
        let mut entries = self.lock();
        if self.generation.load(std::sync::atomic::Ordering::SeqCst) != generation {
            // The identity was forgotten (key or issuer replaced) while this
            // signature ran: hand the token to its waiters, cache nothing.
            if let Some(entry) = entries.get_mut(key) {
                entry.signing = None;
            }
            return result.map(|token| Fresh {
                refresh_after: refresh_after(&token, key.lifetime),
                token: Arc::new(token),
            });
        }
        let entry = entries
            .entry(key.clone())
            .or_insert_with(|| Entry::new(now_mono));
        entry.signing = None;
        let outcome = match result {
            Ok(token) => {
                let token = Arc::new(token);
                let refresh_after = refresh_after(&token, key.lifetime);
                tracing::info!(
                    identity = %key.identity,
                    lifetime_secs = key.lifetime.secs(),
                    exp = token.expires_at,
                    key_id = %token.key_id,
                    uid = caller.uid,
                    gid = caller.gid,
                    pid = caller.pid,
                    "signed new token"
                );
                entry.store(
                    Cached {
                        token: token.clone(),
                        mono_issued_at,
                        refresh_after,
                        touched: AtomicU64::new(0),
                    },
                    self.epoch,
                );
                if let Some(watchers) = &entry.watchers {
                    watchers.send_replace(Some(Issued {
                        token: token.clone(),
                        refresh_after,
                        fresh: true,
                    }));
                }
                Ok(Fresh {
                    token,
                    refresh_after,
                })
            }
            Err(failure) => {
                crate::metrics::global()
                    .refresh_failures
                    .get_or_create(&crate::metrics::IdentityLabels {
                        identity: crate::metrics::Name(key.identity.clone()),
                    })
                    .inc();
                let remaining = entry
                    .current
                    .as_ref()
                    .and_then(|cached| cached.remaining(now_wall, now_mono));
                if let (Some(cached), Some(remaining)) = (entry.current.as_mut(), remaining) {
                    let retry_in = MAX_RETRY_DELAY.min(remaining / 10);
                    *cached = Arc::new(cached.retry_at(now_wall + retry_in));
                    tracing::warn!(
                        identity = %key.identity,
                        lifetime_secs = key.lifetime.secs(),
                        error = %failure,
                        retry_in_secs = retry_in.as_secs_f64(),
                        "re-signing failed; serving the cached token meanwhile"
                    );
                } else {
                    tracing::error!(
                        identity = %key.identity,
                        lifetime_secs = key.lifetime.secs(),
                        error = %failure,
                        "signing failed and no cached token is valid"
                    );
                }
                Err(failure)
            }
        };
        self.publish(&entries);
        outcome
    }
}

fn is_stale(key: &Key, entry: &Entry, now: Instant, epoch: Instant) -> bool {
    entry.signing.is_none()
        && !entry.is_watched()
        && now.saturating_duration_since(entry.last_used(epoch)) >= key.lifetime.duration()
}

/// `iat + lifetime × u`: when a client should ask again.
fn refresh_after(token: &Token, lifetime: Lifetime) -> Duration {
    Duration::from_secs(token.issued_at) + lifetime.duration().mul_f64(refresh_fraction())
}

/// u in [0.45, 0.55), uniform, from the system's CSPRNG.
fn refresh_fraction() -> f64 {
    let mut bytes = [0u8; 8];
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        return 0.5;
    }
    let unit = (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64;
    0.45 + 0.10 * unit
}

#[cfg(test)]
mod tests;
