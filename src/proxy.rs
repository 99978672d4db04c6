//! The authenticating HTTP proxy (`[proxy]` in the config): callers send
//! plain HTTP/1.1 requests to a Unix socket (or a loopback port), and the
//! agent forwards them to Skykit API with `Authorization: Bearer <token>`
//! from its cache, so the token never leaves the agent's process.
//!
//! Per request: admit the caller (the identity's peer-credential policy on
//! a Unix socket; the `Skykit-Agent-Proxy: true` header and a loopback
//! `Host` over TCP), read a small body whole so it can be sent twice, take
//! a token from the cache, rewrite the headers (hop-by-hop ones and the
//! client's own `Authorization` go), and stream the answer back. A 401 for
//! a token at least `retry_min_token_age` old is retried once with a newly
//! signed token. Failures become short plain-text answers: 403 refused,
//! 502 upstream unreachable, 503 no token, 504 upstream too slow.
//!
//! Invariant: the token appears only in the `Authorization` header sent
//! upstream (marked sensitive); no log line, metric or error carries it.

use std::{
    convert::Infallible,
    future::Future as _,
    net::SocketAddr,
    os::unix::fs::MetadataExt as _,
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use http_body_util::{
    BodyExt as _, BodyStream, Empty, Full, StreamBody, combinators::UnsyncBoxBody,
};
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode, Uri, Version,
    body::{Bytes, Frame, Incoming, SizeHint},
    header::{self, HeaderName, HeaderValue},
    http::uri::PathAndQuery,
    service::service_fn,
};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use rustls::pki_types::{CertificateDer, pem::PemObject as _};
use tokio::time::{Instant, Sleep};

use crate::{
    cache::{self, Clock as _, Issued, SystemClock},
    config::{ProxyConfig, ProxyListen},
    identity::{Identity, Registry},
    metrics,
    peer::{Caller, Peer},
    server::Service,
    socket::{self, Access, BoundSocket},
    token::{Lifetime, Token},
};

/// A request body up to this size is read whole before it is sent, so that
/// a 401 can be retried; a larger one is streamed and never retried.
pub const MAX_REPLAYABLE_BODY: usize = 64 * 1024;
/// Requests over TCP must carry this header with the value `true`: a
/// browser cannot add it to a cross-site request without a CORS preflight,
/// which the proxy never grants (the metadata servers' defence).
pub const PROXY_HEADER: &str = "skykit-agent-proxy";
/// Largest `ca_file` read: far more than any bundle of CA certificates.
const MAX_CA_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// A client must send a request's headers within this.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle upstream connections are closed after this.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to stop accepting after running out of descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Headers that describe one hop of a connection, never forwarded either
/// way (RFC 9110 section 7.6.1), besides those `Connection` lists and every
/// `Proxy-*` header.
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Request and response bodies, both directions.
type Body = UnsyncBoxBody<Bytes, BoxError>;
type Upstream = Client<HttpsConnector<HttpConnector>, Body>;

/// A bound proxy listener with its upstream client, ready to [`Proxy::run`].
pub struct Proxy {
    listener: Listener,
    config: ProxyConfig,
    client: Upstream,
}

enum Listener {
    Unix {
        listener: tokio::net::UnixListener,
        /// Removes the socket file when the proxy stops.
        _bound: BoundSocket,
    },
    Tcp(tokio::net::TcpListener),
}

/// Binds the listener and builds the upstream client. Called before the
/// agent reports ready, so a proxy that cannot listen stops the start.
///
/// # Errors
/// The socket cannot be bound (in use, no permission), or `ca_file` cannot
/// be read (it was checked when the config loaded, so it changed since).
pub fn bind(config: &ProxyConfig, access: Access) -> anyhow::Result<Proxy> {
    let client = upstream_client(config)?;
    let listener = match &config.listen {
        ProxyListen::Unix(path) => {
            let mut bound = socket::bind(path, inherited_group(path, access))?;
            let listener = bound
                .take_listener()
                .context("the proxy socket was already handed out")?;
            Listener::Unix {
                listener: tokio::net::UnixListener::from_std(listener)
                    .context("cannot register the proxy socket")?,
                _bound: bound,
            }
        }
        ProxyListen::Tcp(address) => {
            let listener = std::net::TcpListener::bind(address)
                .with_context(|| format!("cannot listen for the proxy on {address}"))?;
            listener.set_nonblocking(true)?;
            Listener::Tcp(tokio::net::TcpListener::from_std(listener)?)
        }
    };
    Ok(Proxy {
        listener,
        config: config.clone(),
        client,
    })
}

impl Proxy {
    /// Where the proxy listens: the socket path, or the address with the
    /// port the kernel chose for port 0.
    pub fn local_addr(&self) -> String {
        match &self.listener {
            Listener::Unix { _bound: bound, .. } => bound.path().display().to_string(),
            Listener::Tcp(listener) => listener
                .local_addr()
                .map(|address| address.to_string())
                .unwrap_or_default(),
        }
    }

    /// Accepts and serves connections until the agent begins to stop, then
    /// lets the requests in flight finish for at most the drain timeout and
    /// returns. Accept errors never end it; each connection runs on a task
    /// of its own, and at most `[limits] max_connections` (as the agent
    /// socket counts them) are open at once: further ones wait in the
    /// kernel's backlog until one closes.
    pub async fn run(self, service: Service, registry: Arc<Registry>) {
        let listen = self.local_addr();
        let identity = if self.config.identity.is_empty() {
            "(default)"
        } else {
            &self.config.identity
        };
        tracing::info!(
            listen,
            upstream = %self.config.upstream,
            identity,
            "serving the proxy"
        );
        if self.config.allow_any_local_user {
            match &self.listener {
                Listener::Tcp(_) => tracing::warn!(
                    listen,
                    identity,
                    "the proxy listens on TCP (allow_any_local_user = true): every local user can make requests with this identity's token; only the Skykit-Agent-Proxy header and the loopback Host check stand in the way of browsers"
                ),
                Listener::Unix { .. } => tracing::warn!(
                    "allow_any_local_user = true has no effect on a Unix socket: the identity's allow_* policy decides who may use the proxy"
                ),
            }
        }
        let limits = service.limits();
        let stopping = service.stopping();
        let state = Arc::new(State {
            config: self.config,
            client: self.client,
            service,
            registry,
        });
        let permits = Arc::new(tokio::sync::Semaphore::new(
            limits.effective_max_connections(),
        ));
        let mut connections = tokio::task::JoinSet::new();
        let mut stop = stopping.clone();
        loop {
            // Finished connections are reaped here, so the set stays small.
            while connections.try_join_next().is_some() {}
            let accepted = tokio::select! {
                biased;
                () = stopped(&mut stop) => break,
                accepted = accept(&self.listener, &permits) => accepted,
            };
            match accepted {
                Ok((accepted, permit)) => {
                    if let Some(origin) = accepted.origin() {
                        let connection = Connection {
                            origin,
                            state: state.clone(),
                            stopping: stopping.clone(),
                            _permit: permit,
                        };
                        connections.spawn(connection.serve(accepted));
                    }
                }
                Err(error) => accept_failed(error).await,
            }
        }
        // New clients are refused from now on (the Unix socket file goes).
        drop(self.listener);
        drain(connections, limits.drain_timeout).await;
    }
}

/// Resolves once the agent begins to stop (or the flag's owner is gone).
async fn stopped(stopping: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stopping| *stopping).await;
}

/// A connection the proxy accepted, before it is served.
enum Accepted {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream, SocketAddr),
}

impl Accepted {
    /// Who is on the other end; `None` (logged) when a Unix peer's
    /// credentials cannot be read.
    fn origin(&self) -> Option<Origin> {
        match self {
            Accepted::Unix(stream) => match Caller::of(stream) {
                Ok(caller) => Some(Origin::Unix(caller)),
                Err(error) => {
                    tracing::warn!(
                        %error,
                        "proxy: dropped a connection whose peer credentials could not be read"
                    );
                    None
                }
            },
            Accepted::Tcp(stream, address) => {
                let _ = stream.set_nodelay(true);
                Some(Origin::Tcp(*address))
            }
        }
    }
}

/// Waits for a free connection slot, then for a connection.
async fn accept(
    listener: &Listener,
    permits: &Arc<tokio::sync::Semaphore>,
) -> std::io::Result<(Accepted, tokio::sync::OwnedSemaphorePermit)> {
    let permit = permits
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| std::io::Error::other("the connection slots were closed"))?;
    let accepted = match listener {
        Listener::Unix { listener, .. } => Accepted::Unix(listener.accept().await?.0),
        Listener::Tcp(listener) => {
            let (stream, address) = listener.accept().await?;
            Accepted::Tcp(stream, address)
        }
    };
    Ok((accepted, permit))
}

/// Lets the connections finish their requests in flight (each closes once
/// it has none) for at most `grace`, then closes the rest.
async fn drain(mut connections: tokio::task::JoinSet<()>, grace: Duration) {
    if connections.is_empty() {
        return;
    }
    tracing::info!(
        connections = connections.len(),
        grace_secs = grace.as_secs_f64(),
        "proxy: stopped accepting; finishing the requests in flight"
    );
    let finished = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::warn!(
            connections = connections.len(),
            grace_secs = grace.as_secs_f64(),
            "proxy: drain deadline passed; closing the connections still open"
        );
        connections.shutdown().await;
    }
}

/// The certificates of a PEM file of CA certificates, for `ca_file`.
///
/// # Errors
/// A message naming the file: unreadable, too large, not PEM, or without a
/// single certificate.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let named = |what: String| format!("{}: {what}", path.display());
    let size = std::fs::metadata(path)
        .map_err(|error| named(format!("cannot read it: {error}")))?
        .len();
    if size > MAX_CA_FILE_BYTES {
        return Err(named(format!(
            "{size} bytes is too large for a file of CA certificates"
        )));
    }
    let pem = std::fs::read(path).map_err(|error| named(format!("cannot read it: {error}")))?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| named(format!("not PEM certificates: {error}")))?;
    if certificates.is_empty() {
        return Err(named(
            "holds no -----BEGIN CERTIFICATE----- block".to_owned(),
        ));
    }
    for (number, certificate) in certificates.iter().enumerate() {
        rustls::RootCertStore::empty()
            .add(certificate.clone())
            .map_err(|error| {
                named(format!(
                    "certificate {} cannot be trusted: {error}",
                    number + 1
                ))
            })?;
    }
    Ok(certificates)
}

/// Mozilla's roots (webpki-roots, compiled in, so the sandboxed service
/// reads no CA files of the host) plus `ca_file`; TLS on aws-lc; HTTP/2
/// when the upstream offers it through ALPN, else HTTP/1.1.
fn upstream_client(config: &ProxyConfig) -> anyhow::Result<Upstream> {
    let mut roots =
        rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &config.ca_file {
        for certificate in read_ca_file(path).map_err(anyhow::Error::msg)? {
            roots
                .add(certificate)
                .with_context(|| format!("cannot trust a certificate of {}", path.display()))?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("cannot set up TLS")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(config.timeout));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .timer(TokioTimer::new())
        .build(connector))
}

/// The socket's access, without the `chown` when the folder already hands
/// the group down: a folder with the set-group-ID bit gives new files its
/// own group, and the system service may not call `chown` at all.
fn inherited_group(path: &Path, access: Access) -> Access {
    let inherits = path
        .parent()
        .and_then(|folder| std::fs::metadata(folder).ok())
        .is_some_and(|folder| folder.mode() & 0o2000 != 0 && Some(folder.gid()) == access.group);
    if inherits {
        Access {
            group: None,
            ..access
        }
    } else {
        access
    }
}

async fn accept_failed(error: std::io::Error) {
    tracing::warn!(%error, "proxy: accept failed");
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

/// What every connection shares.
struct State {
    config: ProxyConfig,
    client: Upstream,
    service: Service,
    registry: Arc<Registry>,
}

/// Who is on the other end of a connection.
enum Origin {
    /// Peer credentials, captured at accept.
    Unix(Caller),
    /// No credentials: any local user.
    Tcp(SocketAddr),
}

impl Origin {
    fn peer(&self) -> Peer {
        match self {
            Origin::Unix(caller) => caller.peer,
            Origin::Tcp(_) => Peer::UNKNOWN,
        }
    }

    fn uid(&self) -> Option<u32> {
        match self {
            Origin::Unix(caller) => Some(caller.peer.uid),
            Origin::Tcp(_) => None,
        }
    }
}

/// One client connection and what it needs to be served.
struct Connection {
    origin: Origin,
    state: Arc<State>,
    /// Turns true when the agent begins to stop.
    stopping: tokio::sync::watch::Receiver<bool>,
    /// Its slot among the connections the proxy keeps open at once.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Connection {
    async fn serve(self, accepted: Accepted) {
        match accepted {
            Accepted::Unix(stream) => self.serve_io(TokioIo::new(stream)).await,
            Accepted::Tcp(stream, _) => self.serve_io(TokioIo::new(stream)).await,
        }
    }

    /// Serves HTTP/1.1 requests until the client closes; once the agent
    /// begins to stop, the request in flight is finished and the
    /// connection closed (an idle one at once).
    async fn serve_io<I>(self, io: I)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let Connection {
            origin,
            state,
            mut stopping,
            _permit,
        } = self;
        let origin = Arc::new(origin);
        let handler = service_fn(move |request: Request<Incoming>| {
            let state = state.clone();
            let origin = origin.clone();
            async move { Ok::<_, Infallible>(handle(&state, &origin, request).await) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(io, handler);
        let mut connection = std::pin::pin!(connection);
        let ended = tokio::select! {
            ended = connection.as_mut() => ended,
            () = stopped(&mut stopping) => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(error) = ended {
            tracing::debug!(%error, "proxy connection ended");
        }
    }
}

/// Answers one request: forwards it, or refuses with a short text. Writes
/// the request's log line and metrics.
async fn handle(state: &State, origin: &Origin, request: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let method = request.method().clone();
    // The query may carry what a caller would not want in logs.
    let path = request.uri().path().to_owned();
    let (response, retried) = match forward(state, origin, request).await {
        Ok(answered) => answered,
        Err(error) => (error.response(), false),
    };
    let status = response.status();
    let elapsed = started.elapsed();
    let metrics = metrics::global();
    metrics
        .proxy_requests
        .get_or_create(&metrics::StatusClassLabels {
            status_class: status_class(status),
        })
        .inc();
    metrics.proxy_request_seconds.observe(elapsed.as_secs_f64());
    let peer = match origin {
        Origin::Unix(caller) => caller.peer.pid.map(|pid| format!("pid {pid}")),
        Origin::Tcp(address) => Some(address.to_string()),
    };
    tracing::info!(
        method = %method,
        path,
        status = status.as_u16(),
        duration_ms = elapsed.as_millis() as u64,
        uid = origin.uid(),
        peer,
        retried,
        "proxied request"
    );
    response
}

/// Why the proxy answered itself instead of the upstream.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("{0}")]
    Forbidden(String),
    #[error("{0} is not supported: the proxy forwards requests to Skykit API, it is no tunnel")]
    MethodNotAllowed(Method),
    #[error("cannot read the request body: {0}")]
    BadRequest(String),
    #[error("the request body did not arrive within {}s", .0.as_secs())]
    RequestTimeout(Duration),
    #[error("{0}")]
    NoToken(String),
    #[error("cannot reach the upstream {upstream}: {reason}")]
    Unreachable { upstream: Uri, reason: String },
    #[error("the upstream {upstream} did not answer within {}s", timeout.as_secs())]
    Timeout { upstream: Uri, timeout: Duration },
}

impl Error {
    fn status(&self) -> StatusCode {
        match self {
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Error::NoToken(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Unreachable { .. } => StatusCode::BAD_GATEWAY,
            Error::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// A short plain-text answer that says it came from the agent.
    fn response(&self) -> Response<Body> {
        let text = format!("skykit-agent proxy: {self}\n");
        let mut response = Response::new(full(Bytes::from(text)));
        *response.status_mut() = self.status();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }
}

/// Forwards `request` upstream, with one retry on a 401 when allowed.
/// Returns the answer and whether it was retried.
async fn forward(
    state: &State,
    origin: &Origin,
    request: Request<Incoming>,
) -> Result<(Response<Body>, bool), Error> {
    if request.method() == Method::CONNECT {
        return Err(Error::MethodNotAllowed(Method::CONNECT));
    }
    let (identity, lifetime) = admit(state, origin, request.headers())?;
    let (parts, incoming) = request.into_parts();
    let mut body = read_body(incoming, &parts.headers, state.config.timeout).await?;
    let key = cache::Key {
        identity: identity.name.clone(),
        lifetime,
    };
    let peer = origin.peer();
    let cache = state.service.cache();
    let issued = cache
        .get(&key, Duration::ZERO, peer)
        .await
        .map_err(|error| Error::NoToken(error.to_string()))?;
    let target = upstream_uri(&state.config.upstream, &parts.uri)?;
    let headers = upstream_headers(&parts.headers);
    let send =
        |token: Arc<Token>, body: Body| send(state, &parts.method, &target, &headers, token, body);
    let first = send(issued.token.clone(), body.take()).await?;
    let timeout = state.config.timeout;
    if first.status() != StatusCode::UNAUTHORIZED {
        return Ok((respond(first, timeout), false));
    }
    let Some(again) = body.again() else {
        tracing::debug!("upstream answered 401 to a streamed body, which cannot be sent again");
        return Ok((respond(first, timeout), false));
    };
    let age = SystemClock
        .wall()
        .saturating_sub(Duration::from_secs(issued.token.issued_at));
    if age < state.config.retry_min_token_age {
        return Ok((respond(first, timeout), false));
    }
    let Some(fresh) = fresh_token(state, &key, &issued.token, peer).await else {
        return Ok((respond(first, timeout), false));
    };
    drop(first);
    metrics::global().proxy_retries.inc();
    tracing::debug!(
        identity = %identity.name,
        age_secs = age.as_secs(),
        "upstream answered 401; sending the request again with a new token"
    );
    let second = send(fresh.token, again).await?;
    Ok((respond(second, timeout), true))
}

/// The identity whose token this request gets, and its lifetime.
fn admit(
    state: &State,
    origin: &Origin,
    headers: &HeaderMap,
) -> Result<(Arc<Identity>, Lifetime), Error> {
    let name = &state.config.identity;
    match origin {
        Origin::Unix(caller) => {
            state
                .service
                .admit(caller, name, None)
                .map_err(|status| match status.code() {
                    tonic::Code::PermissionDenied => Error::Forbidden(status.message().to_owned()),
                    _ => Error::NoToken(status.message().to_owned()),
                })
        }
        Origin::Tcp(_) => {
            let flagged = headers
                .get(PROXY_HEADER)
                .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"true"));
            if !flagged {
                return Err(Error::Forbidden(
                    "requests to the proxy's TCP port must carry the header `Skykit-Agent-Proxy: true`".to_owned(),
                ));
            }
            if !loopback_host(headers) {
                return Err(Error::Forbidden(
                    "requests to the proxy's TCP port must name a loopback Host (localhost, 127.0.0.1 or [::1]), so a web page cannot reach it by renaming its own host".to_owned(),
                ));
            }
            let identities = state.registry.current();
            let identity = identities.resolve(name).cloned().ok_or_else(|| {
                Error::NoToken(format!(
                    "the proxy's identity {name:?} is not configured any more: restore it or restart the agent"
                ))
            })?;
            let lifetime = identity.lifetime;
            Ok((identity, lifetime))
        }
    }
}

/// Whether `Host` names the loopback interface (any port), which a page
/// that rebinds its own domain name to 127.0.0.1 cannot fake: its requests
/// still carry its own name.
fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
    else {
        return false;
    };
    let Ok(authority) = host.parse::<hyper::http::uri::Authority>() else {
        return false;
    };
    let name = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A request body, either read whole (and so sendable twice) or streamed.
enum RequestBody {
    Whole {
        data: Bytes,
        trailers: Option<HeaderMap>,
    },
    Streamed(Option<Body>),
}

impl RequestBody {
    /// The body for the first attempt.
    fn take(&mut self) -> Body {
        match self {
            RequestBody::Whole { data, trailers } => whole(data.clone(), trailers.clone()),
            RequestBody::Streamed(body) => body.take().unwrap_or_else(|| empty()),
        }
    }

    /// The same body again, if it was read whole.
    fn again(&self) -> Option<Body> {
        match self {
            RequestBody::Whole { data, trailers } => Some(whole(data.clone(), trailers.clone())),
            RequestBody::Streamed(_) => None,
        }
    }
}

/// Reads up to [`MAX_REPLAYABLE_BODY`] of the body; beyond that (or when
/// `Content-Length` says so up front), what was read and the rest stream.
async fn read_body(
    mut incoming: Incoming,
    headers: &HeaderMap,
    timeout: Duration,
) -> Result<RequestBody, Error> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_REPLAYABLE_BODY as u64) {
        return Ok(RequestBody::Streamed(Some(streamed(Vec::new(), incoming))));
    }
    let mut read = Vec::new();
    let mut size = 0;
    let mut trailers = None;
    let reading = async {
        while let Some(frame) = incoming.frame().await {
            let frame = frame.map_err(|error| Error::BadRequest(error.to_string()))?;
            match frame.into_data() {
                Ok(data) => {
                    size += data.len();
                    read.push(data);
                    if size > MAX_REPLAYABLE_BODY {
                        return Ok(false);
                    }
                }
                Err(frame) => {
                    trailers = frame.into_trailers().ok();
                    return Ok(true);
                }
            }
        }
        Ok(true)
    };
    let whole_body = tokio::time::timeout(timeout, reading)
        .await
        .map_err(|_| Error::RequestTimeout(timeout))??;
    if !whole_body {
        return Ok(RequestBody::Streamed(Some(streamed(read, incoming))));
    }
    let data = match read.len() {
        0 => Bytes::new(),
        1 => read.remove(0),
        _ => Bytes::from(read.concat()),
    };
    Ok(RequestBody::Whole { data, trailers })
}

fn whole(data: Bytes, trailers: Option<HeaderMap>) -> Body {
    match trailers {
        None if data.is_empty() => empty(),
        None => full(data),
        Some(trailers) => {
            let frames = [Frame::data(data), Frame::trailers(trailers)];
            StreamBody::new(futures_util::stream::iter(frames.map(Ok))).boxed_unsync()
        }
    }
}

/// What was read already, then the rest of the client's body as it comes.
fn streamed(read: Vec<Bytes>, rest: Incoming) -> Body {
    let read = futures_util::stream::iter(read.into_iter().map(|data| Ok(Frame::data(data))));
    let rest = BodyStream::new(rest).map(|frame| frame.map_err(BoxError::from));
    StreamBody::new(read.chain(rest)).boxed_unsync()
}

fn full(data: Bytes) -> Body {
    Full::new(data)
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// The upstream's origin with the request's path and query.
fn upstream_uri(upstream: &Uri, request: &Uri) -> Result<Uri, Error> {
    let mut parts = upstream.clone().into_parts();
    parts.path_and_query = Some(
        request
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).map_err(|error| Error::BadRequest(error.to_string()))
}

/// The client's headers as the upstream gets them: without hop-by-hop
/// headers, the proxy's own header, `Host` (the client set it for the
/// proxy; the client library sets the upstream's), `Expect` (this hop
/// answered it) and the client's `Authorization` (replaced).
fn upstream_headers(client: &HeaderMap) -> HeaderMap {
    let mut headers = without_hop_by_hop(client);
    for name in [
        header::HOST,
        header::EXPECT,
        header::AUTHORIZATION,
        HeaderName::from_static(PROXY_HEADER),
    ] {
        headers.remove(name);
    }
    headers
}

/// A copy of `headers` without hop-by-hop headers: the fixed ones, every
/// `Proxy-*`, and those the `Connection` header lists.
fn without_hop_by_hop(headers: &HeaderMap) -> HeaderMap {
    let listed: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .collect();
    let mut kept = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let name_text = name.as_str();
        let hop_by_hop = HOP_BY_HOP.contains(&name_text)
            || name_text.starts_with("proxy-")
            || listed.iter().any(|listed| listed == name_text);
        if !hop_by_hop {
            kept.append(name.clone(), value.clone());
        }
    }
    kept
}

/// One attempt: the request with `token`, bounded by the timeout up to the
/// response headers.
async fn send(
    state: &State,
    method: &Method,
    target: &Uri,
    headers: &HeaderMap,
    token: Arc<Token>,
    body: Body,
) -> Result<Response<Incoming>, Error> {
    let mut request = Request::new(body);
    *request.method_mut() = method.clone();
    *request.uri_mut() = target.clone();
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers.clone();
    let mut bearer = HeaderValue::try_from(format!("Bearer {}", token.jws))
        .map_err(|_| Error::NoToken("the token is not a valid header value".to_owned()))?;
    // Never indexed by HTTP/2 header compression, never printed by Debug.
    bearer.set_sensitive(true);
    request.headers_mut().insert(header::AUTHORIZATION, bearer);
    let upstream = &state.config.upstream;
    match tokio::time::timeout(state.config.timeout, state.client.request(request)).await {
        Err(_) => Err(Error::Timeout {
            upstream: upstream.clone(),
            timeout: state.config.timeout,
        }),
        Ok(Err(error)) => Err(Error::Unreachable {
            upstream: upstream.clone(),
            reason: causes(&error),
        }),
        Ok(Ok(response)) => Ok(response),
    }
}

/// An error's causes, innermost last, without the client's generic
/// outermost "client error (Connect)".
fn causes(error: &hyper_util::client::legacy::Error) -> String {
    let mut parts = Vec::new();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        parts.push(cause.to_string());
        source = cause.source();
    }
    if parts.is_empty() {
        parts.push(error.to_string());
    }
    parts.join(": ")
}

/// A token signed after `sent`, for the retry; `None` if none can be had.
///
/// RS256 is deterministic and `iat` counts whole seconds, so a token signed
/// in the same second as `sent` would be the very same token: the proxy
/// first waits for the wall clock to reach the next second (at most 1 s,
/// and only when `retry_min_token_age` is under a second).
async fn fresh_token(state: &State, key: &cache::Key, sent: &Token, peer: Peer) -> Option<Issued> {
    let cache = state.service.cache();
    // A concurrent request may have replaced the token already.
    if let Ok(current) = cache.get(key, Duration::ZERO, peer).await
        && current.token.issued_at > sent.issued_at
    {
        return Some(current);
    }
    let next_second = Duration::from_secs(sent.issued_at + 1);
    if let Some(wait) = next_second.checked_sub(SystemClock.wall()) {
        tokio::time::sleep(wait.min(Duration::from_secs(1))).await;
    }
    // No cached token is valid for its whole lifetime, so this signs anew
    // (or joins a signature in flight) and the cache keeps the result.
    let fresh = cache.get(key, key.lifetime.duration(), peer).await.ok()?;
    (fresh.token.jws != sent.jws).then_some(fresh)
}

/// The upstream's answer as the client gets it: hop-by-hop headers removed,
/// the body streamed, and each pause in it bounded by `timeout`.
fn respond(response: Response<Incoming>, timeout: Duration) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    parts.headers = without_hop_by_hop(&parts.headers);
    parts.version = Version::HTTP_11;
    Response::from_parts(parts, IdleTimeout::new(body, timeout).boxed_unsync())
}

/// A response body that fails when the upstream sends nothing for
/// `timeout`: the client then sees the connection close instead of waiting
/// for ever.
struct IdleTimeout {
    body: Incoming,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl IdleTimeout {
    fn new(body: Incoming, timeout: Duration) -> Self {
        IdleTimeout {
            body,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

impl hyper::body::Body for IdleTimeout {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => {
                let next = Instant::now() + this.timeout;
                this.deadline.as_mut().reset(next);
                Poll::Ready(frame.map(|frame| frame.map_err(BoxError::from)))
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(format!(
                    "the upstream sent nothing for {}s in the middle of its response",
                    this.timeout.as_secs()
                )
                .into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn names(map: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<&str> = map.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn hop_by_hop_and_the_clients_credentials_are_not_forwarded() {
        let client = headers(&[
            ("host", "skykit"),
            ("authorization", "Bearer the-clients-own"),
            ("connection", "X-Hop, close"),
            ("connection", "x-other"),
            ("x-hop", "1"),
            ("x-other", "2"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic abc"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("expect", "100-continue"),
            ("skykit-agent-proxy", "true"),
            ("accept", "application/json"),
            ("x-custom", "a"),
            ("x-custom", "b"),
        ]);
        let forwarded = upstream_headers(&client);
        assert_eq!(names(&forwarded), ["accept", "x-custom"]);
        let custom: Vec<_> = forwarded.get_all("x-custom").iter().collect();
        assert_eq!(
            custom,
            ["a", "b"],
            "repeated headers keep every value in order"
        );
    }

    #[test]
    fn responses_lose_only_hop_by_hop_headers() {
        let upstream = headers(&[
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("content-type", "application/json"),
            ("www-authenticate", "Bearer"),
        ]);
        assert_eq!(
            names(&without_hop_by_hop(&upstream)),
            ["content-type", "www-authenticate"]
        );
    }

    #[test]
    fn the_upstream_uri_takes_the_request_path_and_query() {
        let upstream: Uri = "https://skykit-provisioning.appspot.com".parse().unwrap();
        let request: Uri = "/sk-api/v1/devices?page=2".parse().unwrap();
        assert_eq!(
            upstream_uri(&upstream, &request).unwrap().to_string(),
            "https://skykit-provisioning.appspot.com/sk-api/v1/devices?page=2"
        );
        let absolute: Uri = "http://skykit/sk-api/v1/devices".parse().unwrap();
        assert_eq!(
            upstream_uri(&upstream, &absolute).unwrap().to_string(),
            "https://skykit-provisioning.appspot.com/sk-api/v1/devices"
        );
    }

    #[test]
    fn only_loopback_hosts_pass_over_tcp() {
        for host in [
            "localhost",
            "LOCALHOST:8181",
            "127.0.0.1:8181",
            "127.1.2.3",
            "[::1]:80",
        ] {
            assert!(loopback_host(&headers(&[("host", host)])), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8181",
            "10.0.0.1",
            "localhost.evil.example",
        ] {
            assert!(!loopback_host(&headers(&[("host", host)])), "{host}");
        }
        assert!(!loopback_host(&HeaderMap::new()), "no Host at all");
    }

    #[test]
    fn status_classes() {
        assert_eq!(status_class(StatusCode::OK), "2xx");
        assert_eq!(status_class(StatusCode::UNAUTHORIZED), "4xx");
        assert_eq!(status_class(StatusCode::GATEWAY_TIMEOUT), "5xx");
    }

    #[test]
    fn a_ca_file_must_hold_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "nothing here\n").unwrap();
        let error = read_ca_file(&empty).unwrap_err();
        assert!(error.contains("no -----BEGIN CERTIFICATE-----"), "{error}");
        let missing = read_ca_file(&dir.path().join("missing.pem")).unwrap_err();
        assert!(missing.contains("cannot read it"), "{missing}");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let error = read_ca_file(&garbage).unwrap_err();
        assert!(error.contains("certificate 1 cannot be trusted"), "{error}");
        let good = dir.path().join("good.pem");
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        std::fs::write(&good, ca.cert.pem()).unwrap();
        assert_eq!(read_ca_file(&good).unwrap().len(), 1);
    }

    #[test]
    fn the_folders_group_spares_the_chown() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("run");
        std::fs::create_dir(&folder).unwrap();
        let gid = std::fs::metadata(&folder).unwrap().gid();
        let socket = folder.join("proxy.sock");
        let access = Access {
            mode: 0o660,
            group: Some(gid),
        };
        assert_eq!(
            inherited_group(&socket, access),
            access,
            "no set-group-ID bit"
        );
        std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o2750)).unwrap();
        assert_eq!(inherited_group(&socket, access).group, None);
        let other = Access {
            group: Some(gid.wrapping_add(1)),
            ..access
        };
        assert_eq!(inherited_group(&socket, other), other, "another group");
    }
}
