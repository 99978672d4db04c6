//! The agent's resource limits (`[limits]` in the config): every message,
//! stream, connection and signature a client can cause is bounded, so one
//! misbehaving client cannot take the agent down for everyone else.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use tokio::time::Instant;

/// The limits, with the defaults documented in the README.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request or response message, in bytes.
    pub max_message_bytes: usize,
    /// HTTP/2 streams a connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Calls a connection may have in progress; beyond, RESOURCE_EXHAUSTED.
    pub max_calls_per_connection: usize,
    /// A call that takes longer is cancelled.
    pub request_timeout: Duration,
    /// How often an idle connection is pinged...
    pub keepalive_interval: Duration,
    /// ...and how long the ping may go unanswered before it is closed.
    pub keepalive_timeout: Duration,
    /// Largest HTTP/2 header list, in bytes.
    pub max_header_list_bytes: u32,
    /// Open connections at most (also capped below `RLIMIT_NOFILE`); beyond,
    /// new connections wait in the kernel's backlog until one closes.
    pub max_connections: usize,
    /// A new connection must send the whole HTTP/2 preface within this.
    pub handshake_timeout: Duration,
    /// Signatures one uid may force per minute (cache misses it causes, by
    /// new lifetimes or `min_valid_for`), with a burst of as many.
    pub new_signatures_per_uid_per_minute: u32,
    /// How long calls in flight may finish after SIGTERM; well under
    /// systemd's default stop timeout of 90 s.
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 16 * 1024,
            max_concurrent_streams: 64,
            max_calls_per_connection: 64,
            request_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_header_list_bytes: 8 * 1024,
            max_connections: 4096,
            handshake_timeout: Duration::from_secs(5),
            new_signatures_per_uid_per_minute: 120,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// File descriptors kept free for the agent itself (key files, logs,
/// systemd notifications) when the connection cap is derived.
const RESERVED_DESCRIPTORS: u64 = 64;

impl Limits {
    /// The connection cap in force: `max_connections`, but never more than
    /// the descriptor limit (raised to its hard maximum) minus a reserve.
    pub fn effective_max_connections(&self) -> usize {
        let nofile = raise_nofile_limit();
        let by_descriptors = nofile.saturating_sub(RESERVED_DESCRIPTORS).max(1);
        self.max_connections
            .min(usize::try_from(by_descriptors).unwrap_or(usize::MAX))
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard one and returns it.
fn raise_nofile_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let soft = limit.current.unwrap_or(u64::MAX);
    if let Some(hard) = limit.maximum.filter(|&hard| hard > soft) {
        let raised = rustix::process::Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return hard;
        }
    }
    soft
}

/// A token bucket per uid for signatures callers force.
#[derive(Debug)]
pub struct SignatureBudget {
    per_minute: u32,
    buckets: Mutex<HashMap<u32, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl SignatureBudget {
    pub fn new(per_minute: u32) -> Self {
        SignatureBudget {
            per_minute,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one signature from `uid`'s budget; false when it is spent.
    pub fn try_take(&self, uid: u32) -> bool {
        let capacity = f64::from(self.per_minute);
        let per_second = capacity / 60.0;
        let now = Instant::now();
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Full buckets carry no information; dropping them bounds the map
        // by the number of uids active in the last minute.
        if buckets.len() > 1024 {
            buckets.retain(|_, bucket| {
                bucket.tokens + now.duration_since(bucket.updated).as_secs_f64() * per_second
                    < capacity
            });
        }
        let bucket = buckets.entry(uid).or_insert(Bucket {
            tokens: capacity,
            updated: now,
        });
        let refilled = now.duration_since(bucket.updated).as_secs_f64() * per_second;
        bucket.tokens = (bucket.tokens + refilled).min(capacity);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_uid_gets_a_burst_then_the_refill_rate_and_others_are_unaffected() {
        let budget = SignatureBudget::new(60);
        for _ in 0..60 {
            assert!(budget.try_take(1000));
        }
        assert!(!budget.try_take(1000), "the burst is spent");
        assert!(budget.try_take(1001), "another uid has its own budget");
        tokio::time::advance(Duration::from_millis(1100)).await;
        assert!(budget.try_take(1000), "one per second comes back");
        assert!(!budget.try_take(1000));
    }

    #[test]
    fn the_connection_cap_stays_below_the_descriptor_limit() {
        let limits = Limits {
            max_connections: usize::MAX,
            ..Limits::default()
        };
        let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        assert!(
            limits.effective_max_connections() as u64
                <= nofile.saturating_sub(RESERVED_DESCRIPTORS).max(1)
        );
        assert_eq!(
            Limits::default().effective_max_connections().min(4096),
            Limits::default().effective_max_connections()
        );
    }
}
