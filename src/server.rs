//! The gRPC service on the Unix socket: request validation, the mapping of
//! errors to gRPC status codes, and serving until shutdown with a bounded
//! drain.

use std::{future::Future, sync::Arc, time::Duration};

use prost_types::Timestamp;
use tokio::{net::UnixListener, sync::oneshot};
use tonic::{Request, Response, Status, transport::Server};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    cache::{self, Cache, Clock as _, Issued, Signer as _, SystemClock},
    identity::{Identity, Registry},
    limits::{Limits, SignatureBudget},
    memory::Protection,
    metrics,
    peer::{Caller, Incoming},
    proto::{
        CacheEntryStatus, FILE_DESCRIPTOR_SET, GetStatusRequest, GetStatusResponse,
        GetTokenRequest, GetTokenResponse, IdentityStatus, KeyProtection, ListIdentitiesRequest,
        ListIdentitiesResponse, ReloadStatus, SinkStatus, WatchTokenRequest,
        agent_service_server::{AgentService, AgentServiceServer},
        token_service_server::{TokenService, TokenServiceServer},
    },
    status::Tracker,
    token::{Lifetime, LimitError, Token},
};

/// How often entries unused for a lifetime are dropped from the cache.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// The cache as the server uses it: real clocks, keys from the registry.
pub type AgentCache = Cache<Arc<Registry>, SystemClock>;

/// The `skykit.agent.v1` services: `TokenService` and `AgentService`.
#[derive(Clone)]
pub struct Service {
    registry: Arc<Registry>,
    cache: AgentCache,
    tracker: Arc<Tracker>,
    /// Signatures each uid may force.
    budget: Arc<SignatureBudget>,
    limits: Limits,
    /// Turns true when shutdown begins, ending every WatchToken stream.
    stopping: Arc<tokio::sync::watch::Sender<bool>>,
    /// Benchmarks only: sign for every call, bypassing the cache, to
    /// measure signing throughput. Not a user feature: tokens signed in
    /// the same second are identical anyway.
    sign_every_call: bool,
}

impl Service {
    pub fn new(registry: Arc<Registry>, tracker: Arc<Tracker>, limits: Limits) -> Self {
        let cache = Cache::new(registry.clone(), SystemClock);
        Service {
            registry,
            cache,
            tracker,
            budget: Arc::new(SignatureBudget::new(
                limits.new_signatures_per_uid_per_minute,
            )),
            limits,
            stopping: Arc::new(tokio::sync::watch::channel(false).0),
            sign_every_call: false,
        }
    }

    /// Benchmarks only: see [`Service::sign_every_call`].
    pub fn signing_every_call(mut self) -> Self {
        self.sign_every_call = true;
        self
    }

    /// Client connections open now.
    pub fn open_connections(&self) -> usize {
        self.tracker
            .open_connections
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The cache, for status reporting and sweeping.
    pub fn cache(&self) -> &AgentCache {
        &self.cache
    }

    /// The limits in force, for the proxy.
    pub(crate) fn limits(&self) -> Limits {
        self.limits
    }

    /// Turns true when shutdown begins (see [`Service::begin_stopping`]).
    pub(crate) fn stopping(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stopping.subscribe()
    }

    /// Tells everything watching [`Service::stopping`] that the agent is
    /// stopping; [`run`] does it when shutdown begins, and the daemon again
    /// after `run` returns, in case it ended otherwise.
    pub(crate) fn begin_stopping(&self) {
        self.stopping.send_replace(true);
    }
}

#[tonic::async_trait]
impl TokenService for Service {
    async fn get_token(
        &self,
        request: Request<GetTokenRequest>,
    ) -> Result<Response<GetTokenResponse>, Status> {
        let started = std::time::Instant::now();
        let result = self.issue(request).await;
        let metrics = metrics::global();
        match &result {
            Ok(_) => metrics::observe_since(&metrics.get_token_seconds, started),
            Err(status) => metrics.refused(status.code()),
        }
        result
    }

    type WatchTokenStream = WatchStream;

    async fn watch_token(
        &self,
        request: Request<WatchTokenRequest>,
    ) -> Result<Response<Self::WatchTokenStream>, Status> {
        let result = self.watch(request).await;
        if let Err(status) = &result {
            metrics::global().refused(status.code());
        }
        result
    }

    async fn list_identities(
        &self,
        mut request: Request<ListIdentitiesRequest>,
    ) -> Result<Response<ListIdentitiesResponse>, Status> {
        let _call = self.tracker.call();
        let caller = take_caller(&mut request);
        let identities = self.registry.current();
        let default_name = identities.resolve("").map(|identity| identity.name.clone());
        let visible = identities
            .iter()
            .filter(|identity| identity.policy.admits(&caller))
            .map(|identity| identity_status(identity, default_name.as_ref()))
            .collect();
        Ok(Response::new(ListIdentitiesResponse {
            identities: visible,
        }))
    }
}

/// A GetToken call past its policy check.
enum Admitted {
    /// Answered from the cache.
    Served(GetTokenResponse),
    /// To be answered by [`Cache::get_within`] (or a signature of its own).
    ToSign {
        identity: Arc<Identity>,
        lifetime: Lifetime,
        min_valid_for: Duration,
    },
}

/// The stream WatchToken answers with.
pub type WatchStream = std::pin::Pin<
    Box<dyn futures_core::Stream<Item = Result<GetTokenResponse, Status>> + Send + 'static>,
>;

/// One WatchToken stream's state.
struct Watch {
    identity: Arc<str>,
    /// To tell a removed identity from other ends of the channel.
    registry: Arc<Registry>,
    /// The closing status was sent; the stream ends.
    finished: bool,
    /// The token to send first.
    first: Option<Issued>,
    /// The token sent last, so a republished one is not sent twice.
    last: Option<Arc<Token>>,
    updates: tokio::sync::watch::Receiver<Option<Issued>>,
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl Watch {
    /// The next message: the first token, each new one, or the closing
    /// status at shutdown (after which the stream ends).
    async fn next(mut self) -> Option<(Result<GetTokenResponse, Status>, Watch)> {
        if self.finished {
            return None;
        }
        if let Some(first) = self.first.take() {
            self.last = Some(first.token.clone());
            return Some((Ok(issued_response(&first, &self.identity)), self));
        }
        loop {
            if *self.stopping.borrow() {
                return self.close(Status::unavailable(
                    "the agent is shutting down: reconnect and watch again",
                ));
            }
            let closed = tokio::select! {
                changed = self.updates.changed() => changed.is_err(),
                _ = self.stopping.wait_for(|stopping| *stopping) => continue,
            };
            if closed {
                let status = if self.registry.current().resolve(&self.identity).is_none() {
                    Status::not_found(format!(
                        "identity {:?} was removed from the agent's config",
                        self.identity
                    ))
                } else {
                    Status::unavailable("the token stream ended: watch again")
                };
                return self.close(status);
            }
            let Some(issued) = self.updates.borrow_and_update().clone() else {
                continue;
            };
            if self
                .last
                .as_ref()
                .is_some_and(|last| last.jws == issued.token.jws)
            {
                continue;
            }
            self.last = Some(issued.token.clone());
            return Some((Ok(issued_response(&issued, &self.identity)), self));
        }
    }

    /// Sends `status` as the stream's last message.
    fn close(mut self, status: Status) -> Option<(Result<GetTokenResponse, Status>, Watch)> {
        self.finished = true;
        Some((Err(status), self))
    }
}

fn resolve<'a>(
    identities: &'a crate::identity::Identities,
    name: &str,
) -> Result<&'a Arc<Identity>, Status> {
    identities.resolve(name).ok_or_else(|| {
        // Names are at most 64 characters; a longer one is not echoed, so a
        // huge request cannot blow up the response's headers.
        let shown = if name.len() <= 64 {
            format!("{name:?}")
        } else {
            format!("of {} bytes (names are at most 64 characters)", name.len())
        };
        Status::not_found(format!(
            "unknown identity {shown}: use a name from the agent's [[identity]] config (see `skykit-agent identities`), or leave it empty for the default"
        ))
    })
}

/// The identity `name` resolves to in `identities` and the lifetime asked
/// for, once its policy has admitted `caller` (with the audit line).
fn admit_to<'a>(
    identities: &'a crate::identity::Identities,
    caller: &Caller,
    name: &str,
    lifetime: Option<prost_types::Duration>,
) -> Result<(&'a Arc<Identity>, Lifetime), Status> {
    let identity = resolve(identities, name)?;
    authorize(identity, caller)?;
    Ok((identity, requested_lifetime(identity, lifetime)?))
}

fn requested_lifetime(
    identity: &Identity,
    lifetime: Option<prost_types::Duration>,
) -> Result<Lifetime, Status> {
    match lifetime {
        None => Ok(identity.lifetime),
        Some(lifetime) => {
            Lifetime::from_secs(whole_seconds("lifetime", &lifetime)?).map_err(invalid)
        }
    }
}

/// The caller the accept loop attached to the connection; a request that
/// did not come through it (there are none in the agent) is admitted by no
/// policy.
fn take_caller<T>(request: &mut Request<T>) -> Caller {
    request
        .extensions_mut()
        .remove::<Caller>()
        .unwrap_or_else(Caller::unknown)
}

/// Checks the identity's policy and writes the audit line: every refusal,
/// and the first use of each identity on each connection.
fn authorize(identity: &Identity, caller: &Caller) -> Result<(), Status> {
    let allowed = identity.policy.admits(caller);
    if !allowed || caller.first_allowed(&identity.name) {
        tracing::info!(
            target: "skykit_agent::audit",
            identity = %identity.name,
            uid = caller.peer.uid,
            gid = caller.peer.gid,
            pid = caller.peer.pid,
            exe = caller.exe.as_deref(),
            decision = if allowed { "allow" } else { "deny" },
            "audit"
        );
    }
    if allowed {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "uid {} may not use identity {:?}: ask the agent's operator to admit it with allow_uids, allow_users or allow_groups",
        caller.peer.uid, identity.name
    )))
}

fn identity_status(identity: &Identity, default_name: Option<&Arc<str>>) -> IdentityStatus {
    IdentityStatus {
        name: identity.name.to_string(),
        issuer: identity.issuer.to_string(),
        key_id: identity.key.key_id().to_owned(),
        default_lifetime: Some(duration(identity.lifetime)),
        default: Some(&identity.name) == default_name,
    }
}

#[tonic::async_trait]
impl AgentService for Service {
    async fn get_status(
        &self,
        mut request: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        let _call = self.tracker.call();
        let caller = take_caller(&mut request);
        let own = rustix::process::geteuid().as_raw();
        if caller.peer.uid != 0 && caller.peer.uid != own {
            return Err(Status::permission_denied(format!(
                "the agent's status is for root and uid {own} (the agent's user) only; uid {} may not read it",
                caller.peer.uid
            )));
        }
        Ok(Response::new(self.status()))
    }
}

impl Service {
    fn status(&self) -> GetStatusResponse {
        let identities = self.registry.current();
        let default_name = identities.resolve("").map(|identity| identity.name.clone());
        GetStatusResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at: Some(self.tracker.started_at.into()),
            socket: self.tracker.socket.display().to_string(),
            identities: identities
                .iter()
                .map(|identity| identity_status(identity, default_name.as_ref()))
                .collect(),
            cache_entries: self
                .cache
                .snapshot()
                .into_iter()
                .map(|entry| CacheEntryStatus {
                    identity: entry.identity.to_string(),
                    lifetime: Some(duration(entry.lifetime)),
                    issued_at: Some(seconds(entry.issued_at)),
                    expires_at: Some(seconds(entry.expires_at)),
                    refresh_after: Some(since_epoch(entry.refresh_after)),
                })
                .collect(),
            last_reload: self.tracker.last_reload().map(|reload| ReloadStatus {
                finished_at: Some(reload.finished_at.into()),
                ok: reload.error.is_none(),
                error: reload.error.unwrap_or_default(),
            }),
            open_connections: self
                .tracker
                .open_connections
                .load(std::sync::atomic::Ordering::Relaxed) as u32,
            key_protection: Some(key_protection(Protection::current())),
            calls_in_progress: self
                .tracker
                .calls_in_progress
                .load(std::sync::atomic::Ordering::Relaxed) as u32,
            watchers: self.cache.watchers() as u32,
            refreshers: self.cache.refreshers() as u32,
            sinks: self
                .tracker
                .sinks()
                .into_iter()
                .map(|sink| SinkStatus {
                    path: sink.path.display().to_string(),
                    identity: sink.identity,
                    last_written: sink.last_written.map(Timestamp::from),
                    error: sink.error.unwrap_or_default(),
                    failures: sink.failures,
                })
                .collect(),
        }
    }
}

fn key_protection(protection: Protection) -> KeyProtection {
    KeyProtection {
        state: protection.state().to_owned(),
        non_dumpable: protection.non_dumpable,
        core_limit_zero: protection.core_limit_zero,
        locked_bytes: protection.locked_bytes as u64,
        lock_failures: protection.lock_failures as u32,
    }
}

fn duration(lifetime: Lifetime) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::from(lifetime.secs()),
        nanos: 0,
    }
}

fn since_epoch(time: Duration) -> Timestamp {
    Timestamp {
        seconds: time.as_secs() as i64,
        nanos: time.subsec_nanos() as i32,
    }
}

impl Service {
    /// The identity a request names and the lifetime it asks for, once the
    /// identity's policy has admitted the caller. The proxy uses it too, so
    /// both write the same audit lines.
    pub(crate) fn admit(
        &self,
        caller: &Caller,
        name: &str,
        lifetime: Option<prost_types::Duration>,
    ) -> Result<(Arc<Identity>, Lifetime), Status> {
        let identities = self.registry.peek();
        let (identity, lifetime) = admit_to(&identities, caller, name, lifetime)?;
        Ok((identity.clone(), lifetime))
    }

    /// WatchToken without its metrics; see [`TokenService::watch_token`].
    async fn watch(
        &self,
        mut request: Request<WatchTokenRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let caller = take_caller(&mut request);
        let request = request.into_inner();
        let (identity, lifetime) = self.admit(&caller, &request.identity, request.lifetime)?;
        let key = cache::Key {
            identity: identity.name.clone(),
            lifetime,
        };
        // Subscribe first, then read the current token: nothing signed in
        // between can be missed.
        let updates = self.cache.subscribe(&key, caller.peer);
        let first = self
            .cache
            .get(&key, Duration::ZERO, caller.peer)
            .await
            .map_err(|error| Status::unavailable(error.to_string()))?;
        tracing::debug!(identity = %identity.name, uid = caller.peer.uid, "watching");
        let watch = Watch {
            identity: identity.name.clone(),
            registry: self.registry.clone(),
            finished: false,
            first: Some(first),
            last: None,
            updates,
            stopping: self.stopping.subscribe(),
        };
        Ok(Response::new(Box::pin(futures_util::stream::unfold(
            watch,
            Watch::next,
        ))))
    }

    /// GetToken without its metrics; see [`TokenService::get_token`].
    async fn issue(
        &self,
        mut request: Request<GetTokenRequest>,
    ) -> Result<Response<GetTokenResponse>, Status> {
        let _call = self.tracker.call();
        let caller = take_caller(&mut request);
        let request = request.into_inner();
        let (identity, lifetime, min_valid_for) = match self.admit_cached(&caller, &request)? {
            Admitted::Served(response) => return Ok(Response::new(response)),
            Admitted::ToSign {
                identity,
                lifetime,
                min_valid_for,
            } => (identity, lifetime, min_valid_for),
        };
        let key = cache::Key {
            identity: identity.name.clone(),
            lifetime,
        };
        let issued = if self.sign_every_call {
            self.sign_uncached(key).await
        } else {
            let may_sign = || self.budget.try_take(caller.peer.uid);
            self.cache
                .get_within(&key, min_valid_for, caller.peer, &may_sign)
                .await
        }
        .map_err(|error| match error {
            cache::Error::Throttled { .. } => Status::resource_exhausted(format!(
                "{error} (the limit is {} per minute)",
                self.limits.new_signatures_per_uid_per_minute
            )),
            cache::Error::Unavailable { .. } => Status::unavailable(error.to_string()),
        })?;
        if issued.fresh {
            identity.issued_fresh.inc();
        } else {
            identity.issued_cached.inc();
        }
        tracing::debug!(
            identity = %identity.name,
            lifetime_secs = lifetime.secs(),
            uid = caller.peer.uid,
            fresh = issued.fresh,
            "served token"
        );
        Ok(Response::new(issued_response(&issued, &identity.name)))
    }

    /// Admits a GetToken call and, in the common case, answers it from the
    /// cache at once: no `.await`, and neither the identities nor the cache
    /// are locked or reference-counted, since on a busy agent their cache
    /// lines would bounce between the CPUs on every call. (The metrics
    /// still count the call.)
    fn admit_cached(&self, caller: &Caller, request: &GetTokenRequest) -> Result<Admitted, Status> {
        let identities = self.registry.peek();
        let (identity, lifetime) =
            admit_to(&identities, caller, &request.identity, request.lifetime)?;
        let min_valid_for = match request.min_valid_for {
            None => Duration::ZERO,
            Some(min_valid_for) => lifetime
                .check_min_valid_for(whole_seconds("min_valid_for", &min_valid_for)?)
                .map_err(invalid)?,
        };
        if !self.sign_every_call {
            let served = self.cache.cached(
                &identity.name,
                lifetime,
                min_valid_for,
                |token, refresh_after| response(token, refresh_after, &identity.name),
            );
            if let Some(served) = served {
                identity.issued_cached.inc();
                tracing::debug!(
                    identity = %identity.name,
                    lifetime_secs = lifetime.secs(),
                    uid = caller.peer.uid,
                    fresh = false,
                    "served token"
                );
                return Ok(Admitted::Served(served));
            }
        }
        Ok(Admitted::ToSign {
            identity: identity.clone(),
            lifetime,
            min_valid_for,
        })
    }

    /// One signature for this call alone, on a blocking thread.
    async fn sign_uncached(&self, key: cache::Key) -> Result<Issued, cache::Error> {
        let registry = self.registry.clone();
        let identity = key.identity.clone();
        let issued_at = SystemClock.wall().as_secs();
        let signed = tokio::task::spawn_blocking(move || {
            registry.sign(&key.identity, key.lifetime, issued_at)
        })
        .await
        .unwrap_or_else(|_| Err(cache::SignFailure("the signing thread panicked".into())));
        signed
            .map(|token| Issued {
                refresh_after: Duration::from_secs(token.issued_at) + token.lifetime() / 2,
                token: Arc::new(token),
                fresh: true,
            })
            .map_err(|reason| cache::Error::Unavailable { identity, reason })
    }
}

fn issued_response(issued: &Issued, identity: &str) -> GetTokenResponse {
    response(&issued.token, issued.refresh_after, identity)
}

fn response(token: &Token, refresh_after: Duration, identity: &str) -> GetTokenResponse {
    GetTokenResponse {
        token: token.jws.to_string(),
        issued_at: Some(seconds(token.issued_at)),
        expires_at: Some(seconds(token.expires_at)),
        refresh_after: Some(since_epoch(refresh_after)),
        issuer: token.issuer.to_string(),
        identity: identity.to_owned(),
        key_id: token.key_id.to_string(),
    }
}

/// The proto3 JSON mapping of a token response: lowerCamelCase names and
/// RFC 3339 timestamps, as grpcurl prints it. `skykit-agent token --json`
/// prints it and a `format = "json"` sink holds it.
pub fn json(response: &GetTokenResponse) -> String {
    /// Field order follows the proto, as grpcurl prints it.
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Json<'a> {
        token: &'a str,
        issued_at: Option<String>,
        expires_at: Option<String>,
        refresh_after: Option<String>,
        issuer: &'a str,
        identity: &'a str,
        key_id: &'a str,
    }
    let timestamp = |ts: &Option<Timestamp>| ts.as_ref().map(ToString::to_string);
    serde_json::to_string_pretty(&Json {
        token: &response.token,
        issued_at: timestamp(&response.issued_at),
        expires_at: timestamp(&response.expires_at),
        refresh_after: timestamp(&response.refresh_after),
        issuer: &response.issuer,
        identity: &response.identity,
        key_id: &response.key_id,
    })
    .unwrap_or_default()
}

/// [`json`] of the response `GetToken` gives for `issued` and `identity`,
/// for callers (the sinks) that hold the cache's token, not a response.
pub fn issued_json(issued: &Issued, identity: &str) -> String {
    json(&issued_response(issued, identity))
}

fn seconds(since_epoch: u64) -> Timestamp {
    Timestamp {
        seconds: since_epoch as i64,
        nanos: 0,
    }
}

/// Tokens count in whole seconds, so fractions are refused rather than
/// silently rounded.
fn whole_seconds(field: &str, duration: &prost_types::Duration) -> Result<i64, Status> {
    if duration.nanos != 0 {
        return Err(Status::invalid_argument(format!(
            "{field} must be whole seconds, but has {} nanoseconds",
            duration.nanos
        )));
    }
    Ok(duration.seconds)
}

fn invalid(error: LimitError) -> Status {
    Status::invalid_argument(error.to_string())
}

/// The server could not be set up or failed while serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot build the gRPC reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The name health checks use for the token service.
pub const TOKEN_SERVICE_NAME: &str = "skykit.agent.v1.TokenService";

/// Serves on `listener` until `shutdown` resolves, then stops accepting and
/// lets calls in flight finish for at most the drain timeout. Every limit
/// in `[limits]` is applied here.
///
/// Besides the token service it serves `grpc.health.v1.Health` (SERVING
/// until shutdown begins) and server reflection in both versions, so
/// grpcurl works without proto files.
pub async fn run(
    listener: UnixListener,
    service: Service,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let limits = service.limits;
    let grace = limits.drain_timeout;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(TOKEN_SERVICE_NAME, ServingStatus::Serving)
        .await;
    // v1 for current clients, v1alpha for grpcurl 1.8 and other older ones.
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let (draining, drain_started) = oneshot::channel();
    let stopping = service.stopping.clone();
    let signal = async move {
        shutdown.await;
        tracing::info!(
            grace_secs = grace.as_secs_f64(),
            "stopped accepting; draining calls in flight"
        );
        mark_not_serving(&health).await;
        stopping.send_replace(true);
        let _ = draining.send(());
    };
    let sweeper = tokio::spawn(sweep_periodically(service.cache.clone()));
    let max_connections = limits.effective_max_connections();
    tracing::debug!(?limits, max_connections, "limits");
    let incoming = Incoming::new(listener, service.tracker.open_connections.clone())
        .max_connections(max_connections)
        .handshake_timeout(limits.handshake_timeout);
    let message_limit = limits.max_message_bytes;
    let server = Server::builder()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .concurrency_limit_per_connection(limits.max_calls_per_connection)
        // Calls beyond the per-connection limit are refused with
        // RESOURCE_EXHAUSTED at once instead of queueing without bound.
        .load_shed(true)
        .timeout(limits.request_timeout)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .http2_max_header_list_size(limits.max_header_list_bytes)
        .add_service(
            TokenServiceServer::new(service.clone())
                .max_decoding_message_size(message_limit)
                .max_encoding_message_size(message_limit),
        )
        .add_service(
            // Status reports grow with the cache, so only requests are capped.
            AgentServiceServer::new(service).max_decoding_message_size(message_limit),
        )
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(incoming, signal);
    let result = tokio::select! {
        biased;
        result = server => result.map_err(Error::from),
        () = drain_deadline(drain_started, grace) => {
            tracing::warn!(grace_secs = grace.as_secs_f64(), "drain deadline passed; closing the connections still open");
            Ok(())
        }
    };
    sweeper.abort();
    result
}

async fn mark_not_serving(health: &HealthReporter) {
    for service in ["", TOKEN_SERVICE_NAME] {
        health
            .set_service_status(service, ServingStatus::NotServing)
            .await;
    }
}

/// Reflection over our proto and the health proto.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

async fn drain_deadline(drain_started: oneshot::Receiver<()>, grace: Duration) {
    if drain_started.await.is_err() {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(grace).await;
}

async fn sweep_periodically(cache: AgentCache) {
    let mut interval = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        interval.tick().await;
        cache.sweep();
    }
}

#[cfg(test)]
mod tests;
