//! `WatchToken` end to end with the real binary: a watcher gets the current
//! token at once and the re-signed one at the refresh point (a 60 s
//! lifetime, so this test takes about half a minute); watchers on several
//! connections share one token, at start and after a SIGHUP key rotation,
//! which is pushed at once; the same refusals as `GetToken`; a client that
//! goes away leaves no watcher, refresher or connection behind, however
//! often it comes and goes; SIGTERM ends every stream with UNAVAILABLE
//! before the agent exits 0; and a reload that removes the watched
//! identity ends its streams with a status.
//!
//! The paused-time tests of the refresh timer are unit tests of the cache
//! (`src/cache/tests.rs`). [`Client`] and [`eventually`] also serve the
//! metrics tests.

use std::{
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use rustix::process::Signal;
use skykit_agent::proto::{
    GetStatusRequest, GetStatusResponse, GetTokenResponse, WatchTokenRequest,
    agent_service_client::AgentServiceClient, token_service_client::TokenServiceClient,
};
use tokio::runtime::Runtime;
use tonic::{Code, Status, Streaming, transport::Channel};

use crate::support::*;

/// How often the polling loops here look again.
const POLL: Duration = Duration::from_millis(10);
/// How long the agent may take to notice a client went away and drop its
/// watchers, refresher tasks and connections.
const CLEANUP_DEADLINE: Duration = Duration::from_secs(10);
/// How soon every watcher must hold a token of the new key after SIGHUP
/// (the reload reads and self-tests the key, then signs once).
const PUSH_DEADLINE: Duration = Duration::from_secs(5);
/// The `[limits] drain_timeout` of the shutdown test: the agent must exit
/// well before it, since its streams end on their own.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Helpers: configs, clients, watchers.
// ---------------------------------------------------------------------------

/// Writes `config.toml`: the top-level `settings`, then the default
/// identity signing with `key`, then the `tables` (TOML).
pub(crate) fn write_config(dir: &Dir, key: &Path, settings: &str, tables: &str) -> PathBuf {
    dir.write_mode(
        "config.toml",
        format!(
            "{settings}\n[[identity]]\nissuer = \"{ISSUER}\"\nkey = \"{}\"\n\n{tables}",
            key.display()
        ),
        0o644,
    )
}

/// Starts `serve --socket <dir>/agent.sock --config CONFIG` and waits until
/// it listens.
pub(crate) fn serve_config<'d>(dir: &'d Dir, config: &Path) -> Agent<'d> {
    let mut command = dir.command(&["serve", "--socket"]);
    command.arg(dir.socket()).arg("--config").arg(config);
    dir.start(command)
}

/// A runtime whose workers keep the clients' connections going while the
/// test thread waits in blocking code (for the agent to exit, say).
pub(crate) fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build a tokio runtime")
}

/// One gRPC connection to the agent, for any of its services.
pub(crate) struct Client<'r> {
    rt: &'r Runtime,
    channel: Channel,
}

impl<'r> Client<'r> {
    /// Connects as the test's user.
    pub(crate) fn connect(rt: &'r Runtime, socket: &Path) -> Client<'r> {
        let channel = rt
            .block_on(skykit_agent::client::channel(socket))
            .unwrap_or_else(|error| panic!("cannot connect to {}: {error}", socket.display()));
        Client { rt, channel }
    }

    /// Uses `stream`, already connected (as another user), as the only
    /// connection: should it break, the channel fails instead of
    /// reconnecting as the test's user.
    fn over(rt: &'r Runtime, stream: UnixStream) -> Client<'r> {
        let channel = crate::support::channel_over(rt, stream);
        Client { rt, channel }
    }

    /// `WatchToken`; `None` leaves the lifetime unset.
    pub(crate) fn watch(
        &self,
        identity: &str,
        lifetime: Option<i64>,
    ) -> Result<Watcher<'r>, Status> {
        let mut client = TokenServiceClient::new(self.channel.clone());
        let request = WatchTokenRequest {
            identity: identity.to_owned(),
            lifetime: lifetime.map(seconds),
        };
        self.rt
            .block_on(client.watch_token(request))
            .map(|response| Watcher {
                rt: self.rt,
                stream: response.into_inner(),
            })
    }

    /// A watch expected to be admitted.
    pub(crate) fn watching(&self, identity: &str, lifetime: Option<i64>) -> Watcher<'r> {
        self.watch(identity, lifetime)
            .unwrap_or_else(|status| panic!("WatchToken {identity:?} failed: {status:?}"))
    }

    /// `GetToken`; `None` leaves the lifetime unset.
    pub(crate) fn get_token(
        &self,
        identity: &str,
        lifetime: Option<i64>,
    ) -> Result<GetTokenResponse, Status> {
        let mut client = TokenServiceClient::new(self.channel.clone());
        self.rt
            .block_on(client.get_token(request(identity, lifetime, None)))
            .map(tonic::Response::into_inner)
    }

    /// A `GetToken` expected to succeed.
    pub(crate) fn token(&self, identity: &str, lifetime: Option<i64>) -> GetTokenResponse {
        self.get_token(identity, lifetime)
            .unwrap_or_else(|status| panic!("GetToken {identity:?} failed: {status:?}"))
    }

    pub(crate) fn status(&self) -> GetStatusResponse {
        let mut client = AgentServiceClient::new(self.channel.clone());
        self.rt
            .block_on(client.get_status(GetStatusRequest {}))
            .unwrap_or_else(|status| panic!("GetStatus failed: {status:?}"))
            .into_inner()
    }
}

/// One open `WatchToken` stream; dropping it cancels the call.
pub(crate) struct Watcher<'r> {
    rt: &'r Runtime,
    stream: Streaming<GetTokenResponse>,
}

impl Watcher<'_> {
    /// The next message, or what came instead of one within `within`:
    /// `Err` for a status, `Ok(None)` for the end of the stream.
    fn message_within(
        &mut self,
        within: Duration,
    ) -> Result<Result<Option<GetTokenResponse>, Status>, tokio::time::error::Elapsed> {
        let stream = &mut self.stream;
        self.rt
            .block_on(async move { tokio::time::timeout(within, stream.message()).await })
    }

    /// The next token, which must come within `within`.
    pub(crate) fn next(&mut self, within: Duration, agent: &Agent<'_>) -> GetTokenResponse {
        match self.message_within(within) {
            Ok(Ok(Some(response))) => response,
            other => panic!(
                "expected a token within {within:?}, got {other:?}\n--- agent stderr ---\n{}",
                agent.stderr()
            ),
        }
    }
}

/// Polls `check` until it returns `Ok`, failing after `deadline` with the
/// last thing it reported and the agent's log.
pub(crate) fn eventually<T>(
    what: &str,
    deadline: Duration,
    agent: &Agent<'_>,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let give_up = Instant::now() + deadline;
    loop {
        match check() {
            Ok(found) => return found,
            Err(last) if Instant::now() > give_up => panic!(
                "timed out after {deadline:?} waiting for {what}; last seen: {last}\n--- agent stderr ---\n{}",
                agent.stderr()
            ),
            Err(_) => thread::sleep(POLL),
        }
    }
}

/// The counts of `GetStatus` that a watcher changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    watchers: u32,
    refreshers: u32,
    open_connections: u32,
    cache_entries: usize,
}

impl Counts {
    fn of(status: &GetStatusResponse) -> Counts {
        Counts {
            watchers: status.watchers,
            refreshers: status.refreshers,
            open_connections: status.open_connections,
            cache_entries: status.cache_entries.len(),
        }
    }
}

/// Polls `GetStatus` until its counts are `expected`.
fn wait_for_counts(client: &Client<'_>, agent: &Agent<'_>, expected: Counts, when: &str) {
    eventually(
        &format!("{expected:?} {when}"),
        CLEANUP_DEADLINE,
        agent,
        || {
            let counts = Counts::of(&client.status());
            if counts == expected {
                Ok(())
            } else {
                Err(format!("{counts:?}"))
            }
        },
    );
}

/// Asserts that `WatchToken` and `GetToken` refuse the same request with
/// `code` and a message containing `needle`, and that the refused watch
/// left no watcher behind (checked through `admin`, a root connection).
fn check_refused(
    client: &Client<'_>,
    admin: &Client<'_>,
    (identity, lifetime): (&str, Option<i64>),
    code: Code,
    needle: &str,
) {
    let watched = client.watch(identity, lifetime).err();
    let got = client.get_token(identity, lifetime).err();
    for (rpc, status) in [("WatchToken", watched), ("GetToken", got)] {
        let status = status.unwrap_or_else(|| {
            panic!("{rpc} of {identity:?} lifetime {lifetime:?} succeeded; expected {code:?}")
        });
        assert!(
            status.code() == code && status.message().contains(needle),
            "{rpc} of {identity:?} lifetime {lifetime:?}\n--- expected ---\n{code:?} containing {needle:?}\n--- actual ---\n{:?}: {}\n---",
            status.code(),
            status.message()
        );
    }
    let status = admin.status();
    assert_eq!(
        (status.watchers, status.refreshers),
        (0, 0),
        "a refused WatchToken must not subscribe"
    );
}

// ---------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------

/// The end-to-end refresh: with a 60 s lifetime the refresh point is 27 to
/// 33 s after `iat`, and the re-signed token arrives at both watchers
/// without any request, then is what `GetToken` serves from its cache.
#[test]
fn watchers_get_the_current_token_at_once_and_the_re_signed_one_at_the_refresh_point() {
    let dir = Dir::new();
    let key = shared_key();
    let agent = dir.serve(&key.write(&dir, "private.pem"));
    let rt = runtime();
    let (one, two) = (
        Client::connect(&rt, agent.socket()),
        Client::connect(&rt, agent.socket()),
    );

    let mut first_watcher = one.watching("", Some(60));
    let first = first_watcher.next(DEADLINE, &agent);
    let claims = check_response(&first, key, "default", 60);
    let mut second_watcher = two.watching("", Some(60));
    let second = second_watcher.next(DEADLINE, &agent);
    eqnice(
        &first.token,
        &second.token,
        "the second watcher's first token",
    );
    let status = one.status();
    assert_eq!(
        (status.watchers, status.refreshers),
        (2, 1),
        "two watchers of one entry share one refresher"
    );

    let refresh_after = first.refresh_after.expect("refresh_after is set").seconds as u64;
    // Generous: the refresh point is at most 33 s away.
    let within = Duration::from_secs(refresh_after.saturating_sub(now_secs())) + DEADLINE;
    let renewed = first_watcher.next(within, &agent);
    let arrived = now_secs();
    let renewed_claims = check_response(&renewed, key, "default", 60);
    assert!(
        renewed.token != first.token,
        "the watcher got the same token again"
    );
    assert!(
        renewed_claims.iat >= refresh_after && arrived >= refresh_after,
        "re-signed before the refresh point: iat {}, arrived {arrived}, refresh_after {refresh_after} (first iat {})",
        renewed_claims.iat,
        claims.iat
    );
    assert!(
        renewed_claims.iat <= refresh_after + 5,
        "re-signed late: iat {} for refresh_after {refresh_after}",
        renewed_claims.iat
    );
    let also = second_watcher.next(DEADLINE, &agent);
    eqnice(&renewed.token, &also.token, "the other watcher's new token");
    // One signature serves callers too: GetToken answers from the cache.
    let served = one.token("", Some(60));
    eqnice(&renewed.token, &served.token, "GetToken after the refresh");
}

/// Three connections watch; all get the same token, and after the key
/// file is replaced and SIGHUP reloads it, all get the same token of the
/// new key within seconds, with no request.
#[test]
fn several_watchers_share_one_token_and_get_the_rotated_key_pushed_at_once() {
    let dir = Dir::new();
    let (old, new) = (shared_key(), &pkcs1_key());
    let key_path = old.write(&dir, "private.pem");
    let agent = serve_config(&dir, &write_config(&dir, &key_path, "", ""));
    let rt = runtime();
    let clients: Vec<Client<'_>> = (0..3)
        .map(|_| Client::connect(&rt, agent.socket()))
        .collect();
    // Cached before anyone watches, so the refresher starts out sleeping
    // until the refresh point, minutes away: only the push of the rotation
    // itself can wake the watchers within PUSH_DEADLINE.
    let cached = clients[0].token("", Some(600));
    let mut watchers: Vec<Watcher<'_>> = clients
        .iter()
        .map(|client| client.watching("", Some(600)))
        .collect();
    let firsts: Vec<GetTokenResponse> = watchers
        .iter_mut()
        .map(|watcher| watcher.next(DEADLINE, &agent))
        .collect();
    check_response(&cached, old, "default", 600);
    for (n, first) in firsts.iter().enumerate() {
        eqnice(
            &cached.token,
            &first.token,
            &format!("watcher {n}'s first token"),
        );
    }
    let status = clients[0].status();
    assert_eq!(
        (status.watchers, status.refreshers, status.open_connections),
        (3, 1, 3)
    );

    new.write(&dir, "private.pem");
    let rotated_at = Instant::now();
    agent.signal(Signal::HUP);
    let pushed: Vec<GetTokenResponse> = watchers
        .iter_mut()
        .map(|watcher| watcher.next(PUSH_DEADLINE, &agent))
        .collect();
    let took = rotated_at.elapsed();
    assert!(
        took < PUSH_DEADLINE,
        "the rotation took {took:?} to reach every watcher"
    );
    check_response(&pushed[0], new, "default", 600);
    for (n, token) in pushed.iter().enumerate() {
        assert!(
            token.token != cached.token,
            "watcher {n} got the old key's token again"
        );
        eqnice(
            &pushed[0].token,
            &token.token,
            &format!("watcher {n}'s token after the rotation"),
        );
    }
    let served = clients[1].token("", Some(600));
    eqnice(
        &pushed[0].token,
        &served.token,
        "GetToken after the rotation",
    );
    let reload = clients[2]
        .status()
        .last_reload
        .expect("the reload is recorded");
    assert!(reload.ok, "the reload failed: {}", reload.error);
}

/// The policy and validation of GetToken apply: uid 65534, which the
/// identity does not admit, gets PERMISSION_DENIED; an unknown identity
/// NOT_FOUND; a lifetime below 60 s or with nanos INVALID_ARGUMENT. No
/// refused watch leaves a watcher behind.
#[test]
fn watch_token_refuses_what_get_token_refuses() {
    require_root("call the agent as uid 65534");
    let dir = Dir::new();
    chmod(dir.path(), 0o755);
    let key_path = shared_key().write(&dir, "private.pem");
    let agent = serve_config(
        &dir,
        &write_config(&dir, &key_path, "socket_mode = \"0666\"\n", ""),
    );
    let rt = runtime();
    let admin = Client::connect(&rt, agent.socket());
    let nobody = Client::over(&rt, connect_as_nobody(agent.socket(), &[]));

    check_refused(
        &nobody,
        &admin,
        ("", None),
        Code::PermissionDenied,
        "uid 65534 may not use identity \"default\"",
    );
    check_refused(
        &admin,
        &admin,
        ("nope", None),
        Code::NotFound,
        "unknown identity \"nope\"",
    );
    check_refused(
        &admin,
        &admin,
        ("", Some(59)),
        Code::InvalidArgument,
        "lifetime 59s is under the minimum",
    );
    check_refused(
        &admin,
        &admin,
        ("", Some(3601)),
        Code::InvalidArgument,
        "lifetime 3601s is over the maximum",
    );
    let mut client = TokenServiceClient::new(admin.channel.clone());
    let fractional = rt.block_on(client.watch_token(WatchTokenRequest {
        identity: String::new(),
        lifetime: Some(prost_types::Duration {
            seconds: 600,
            nanos: 1,
        }),
    }));
    match fractional {
        Err(status) if status.code() == Code::InvalidArgument => {}
        other => panic!(
            "a lifetime with nanos: expected INVALID_ARGUMENT, got {:?}",
            other.map(|_| "a stream")
        ),
    }
    // The admitted caller still watches on the same agent.
    let mut watcher = admin.watching("", None);
    check_response(
        &watcher.next(DEADLINE, &agent),
        shared_key(),
        "default",
        3600,
    );
}

/// Clients that open watchers and go away, five times over: each time the
/// agent drops their watchers, the refresher tasks of their entries and
/// their connections, back to exactly where it started, whether a client
/// cancels its streams first and disconnects later or just disconnects.
#[test]
fn clients_that_go_away_leave_no_watcher_refresher_or_connection_behind() {
    const CLIENTS: usize = 6;
    let dir = Dir::new();
    let agent = dir.serve(&shared_key().write(&dir, "private.pem"));
    let rt = runtime();
    let admin = Client::connect(&rt, agent.socket());
    // Only the admin's connection (the start-up probe's has closed), and
    // nothing watched or cached yet.
    let start = Counts {
        watchers: 0,
        refreshers: 0,
        open_connections: 1,
        cache_entries: 0,
    };
    wait_for_counts(&admin, &agent, start, "before any watcher");

    for cycle in 0..5 {
        let clients: Vec<Client<'_>> = (0..CLIENTS)
            .map(|_| Client::connect(&rt, agent.socket()))
            .collect();
        // Two lifetimes: two entries, so two refreshers.
        let mut watchers: Vec<Watcher<'_>> = clients
            .iter()
            .enumerate()
            .map(|(n, client)| client.watching("", Some(if n % 2 == 0 { 600 } else { 900 })))
            .collect();
        for watcher in &mut watchers {
            watcher.next(DEADLINE, &agent);
        }
        let open = Counts {
            watchers: CLIENTS as u32,
            refreshers: 2,
            open_connections: 1 + CLIENTS as u32,
            cache_entries: 2,
        };
        wait_for_counts(&admin, &agent, open, &format!("in cycle {cycle}"));

        if cycle % 2 == 0 {
            drop(watchers);
            let cancelled = Counts {
                watchers: 0,
                refreshers: 0,
                ..open
            };
            wait_for_counts(
                &admin,
                &agent,
                cancelled,
                &format!("after cancelling the streams in cycle {cycle}"),
            );
            drop(clients);
        } else {
            drop(watchers);
            drop(clients);
        }
        // The entries stay cached for GetToken callers (and are swept when
        // unused for a lifetime); everything else is back to the start.
        wait_for_counts(
            &admin,
            &agent,
            Counts {
                cache_entries: 2,
                ..start
            },
            &format!("after the clients went away in cycle {cycle}"),
        );
    }
}

/// SIGTERM with two watchers open: each stream yields UNAVAILABLE saying
/// the agent is shutting down, then ends; the agent exits 0 long before
/// its drain timeout (nothing waits on the streams) and removes its socket.
#[test]
fn sigterm_ends_every_stream_with_unavailable_and_the_agent_exits_promptly() {
    let dir = Dir::new();
    let key_path = shared_key().write(&dir, "private.pem");
    let agent_config = write_config(
        &dir,
        &key_path,
        "",
        &format!(
            "[limits]\ndrain_timeout = \"{}s\"\n",
            DRAIN_TIMEOUT.as_secs()
        ),
    );
    let mut agent = serve_config(&dir, &agent_config);
    let rt = runtime();
    let clients = [
        Client::connect(&rt, agent.socket()),
        Client::connect(&rt, agent.socket()),
    ];
    let mut watchers = [
        clients[0].watching("", None),
        clients[1].watching("", Some(600)),
    ];
    for watcher in &mut watchers {
        watcher.next(DEADLINE, &agent);
    }

    let stopped_at = Instant::now();
    agent.signal(Signal::TERM);
    for (n, watcher) in watchers.iter_mut().enumerate() {
        match watcher.message_within(DEADLINE) {
            Ok(Err(status))
                if status.code() == Code::Unavailable
                    && status.message().contains("the agent is shutting down") => {}
            other => panic!(
                "watcher {n}\n--- expected ---\nUNAVAILABLE \"the agent is shutting down...\"\n--- actual ---\n{other:?}\n--- agent stderr ---\n{}",
                agent.stderr()
            ),
        }
        match watcher.message_within(DEADLINE) {
            Ok(Ok(None)) => {}
            other => panic!("watcher {n}: expected the end of the stream, got {other:?}"),
        }
    }
    let status = agent.wait();
    let took = stopped_at.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM ended the agent with {status}\n--- stderr ---\n{}",
        agent.stderr()
    );
    assert!(
        took < DRAIN_TIMEOUT,
        "the agent took {took:?} to exit, not less than its drain timeout {DRAIN_TIMEOUT:?}: did it wait on the streams?\n--- stderr ---\n{}",
        agent.stderr()
    );
    assert!(
        !agent.stderr().contains("drain deadline passed"),
        "the agent hit its drain deadline:\n{}",
        agent.stderr()
    );
    assert!(
        std::fs::symlink_metadata(dir.socket()).is_err(),
        "the socket file is still there after SIGTERM"
    );
}

/// A reload that removes the watched identity must not leave its watchers
/// waiting in silence while their token runs out: the stream ends with an
/// error status (it names the identity) within seconds, as GetToken of
/// that identity now fails with NOT_FOUND.
#[test]
fn a_reload_that_removes_the_watched_identity_ends_its_streams() {
    let dir = Dir::new();
    let key_path = shared_key().write(&dir, "private.pem");
    let identity = |name: &str, extra: &str| {
        format!(
            "[[identity]]\nname = \"{name}\"\nissuer = \"{ISSUER}\"\nkey = \"{}\"\n{extra}\n",
            key_path.display()
        )
    };
    let both = [identity("main", "default = true"), identity("gone", "")].concat();
    let config = dir.write_mode("config.toml", &both, 0o644);
    let agent = serve_config(&dir, &config);
    let rt = runtime();
    let client = Client::connect(&rt, agent.socket());
    let mut watcher = client.watching("gone", Some(600));
    watcher.next(DEADLINE, &agent);

    dir.write_mode("config.toml", identity("main", ""), 0o644);
    agent.signal(Signal::HUP);
    match watcher.message_within(PUSH_DEADLINE) {
        Ok(Err(status)) if status.message().contains("gone") => {}
        other => panic!(
            "after the reload removed identity \"gone\"\n--- expected ---\nan error status naming \"gone\" within {PUSH_DEADLINE:?}\n--- actual ---\n{other:?}\n--- agent stderr ---\n{}",
            agent.stderr()
        ),
    }
    match client.get_token("gone", Some(600)) {
        Err(status) if status.code() == Code::NotFound => {}
        other => panic!("GetToken of the removed identity: expected NOT_FOUND, got {other:?}"),
    }
}
