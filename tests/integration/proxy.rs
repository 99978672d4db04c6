//! The authenticating proxy (`[proxy]`), end to end with the real binary:
//! a raw HTTP/1.1 client on one side, and on the other an upstream server
//! inside the test (hyper on 127.0.0.1, plain HTTP or TLS with a CA made
//! at test time) that verifies each request's token with the public key
//! and echoes what it received as JSON.
//!
//! Covered: GET and POST with streamed (chunked) bodies below and above
//! the 64 KiB retry buffer, the client's `Authorization` replaced and
//! hop-by-hop headers removed, a 401 retried once with a newly signed
//! token (and not retried when the body was streamed or the token young),
//! the TCP listener's header and Host rules and its config error, the peer
//! policy on the Unix socket, an unreachable upstream (502), a slow one
//! (504), TLS with HTTP/2 through ALPN, a listener that cannot bind,
//! metrics, no token in the logs, and the systemd drop-in `network.conf`.

use std::{
    convert::Infallible,
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use aws_lc_rs::digest;
use http_body_util::{BodyExt, Full};
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rustix::process::Signal;
use serde_json::Value;

use crate::support::*;

/// The identity's token lifetime in these tests (the default, 1 h).
const LIFETIME: u64 = 3600;
/// How long `/slow` keeps the proxy waiting: well beyond the 1 s timeout
/// the slow-upstream test configures.
const SLOW: Duration = Duration::from_secs(5);
/// How often the polling loops here look again.
const POLL: Duration = Duration::from_millis(10);
/// The retry buffer's size, as the README documents it.
const BUFFER: usize = 64 * 1024;

// ---------------------------------------------------------------------------
// The upstream: a hyper server on its own runtime that records and echoes.
// ---------------------------------------------------------------------------

/// One request as the upstream received it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    query: Option<String>,
    version: String,
    /// `Host` over HTTP/1.1, `:authority` over HTTP/2.
    authority: Option<String>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    token: Option<String>,
    /// `iat` of a token that verified with the public key, or why not.
    token_check: Result<u64, String>,
}

struct UpstreamState {
    public_pem: String,
    seen: Mutex<Vec<Seen>>,
}

/// The test's stand-in for Skykit API. Behaviour by path:
/// - `/slow...`: answers after [`SLOW`];
/// - `/unauthorized-once...`: 401 to the first request on that path, then
///   as usual;
/// - `/always-401...`: 401;
/// - anything else: 200, or 401 when the token does not verify.
///
/// Every answer is the JSON echo of the request.
struct Upstream {
    address: SocketAddr,
    tls: bool,
    state: Arc<UpstreamState>,
    /// Dropping it stops the server.
    _runtime: tokio::runtime::Runtime,
}

impl Upstream {
    fn plain() -> Upstream {
        Upstream::start(None)
    }

    /// HTTPS offering HTTP/2 and HTTP/1.1 through ALPN, with a certificate
    /// for 127.0.0.1 and localhost from a CA made now, written to
    /// `ca.pem` in `dir` for the agent's `ca_file`.
    fn tls(dir: &Dir) -> (Upstream, PathBuf) {
        let ca_key = rcgen::KeyPair::generate().expect("generate the CA key");
        let mut ca_params =
            rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "skykit-agent proxy test CA");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("sign the CA");
        let leaf_key = rcgen::KeyPair::generate().expect("generate the server key");
        let leaf_params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("server certificate parameters");
        let leaf = leaf_params
            .signed_by(&leaf_key, &ca)
            .expect("sign the server certificate");
        let ca_file = dir.write_mode("ca.pem", ca.pem(), 0o644);
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone(), ca.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der())
                .expect("the server key's DER"),
        )
        .expect("the server certificate and key");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        (
            Upstream::start(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))),
            ca_file,
        )
    }

    fn start(tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("build the upstream's runtime");
        let state = Arc::new(UpstreamState {
            public_pem: shared_key().public_pem.clone(),
            seen: Mutex::new(Vec::new()),
        });
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind the upstream");
        let address = listener.local_addr().expect("the upstream's address");
        let is_tls = tls.is_some();
        runtime.spawn(serve_upstream(listener, tls, state.clone()));
        Upstream {
            address,
            tls: is_tls,
            state,
            _runtime: runtime,
        }
    }

    /// What the config's `upstream` says.
    fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.address)
    }

    /// The requests received on `path`, in order.
    fn seen(&self, path: &str) -> Vec<Seen> {
        self.state
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|seen| seen.path == path)
            .cloned()
            .collect()
    }

    /// Every request received.
    fn all(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }
}

async fn serve_upstream(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<UpstreamState>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| answer(state.clone(), request));
            match tls {
                None => {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
                Some(acceptor) => {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
                    let io = TokioIo::new(stream);
                    if h2 {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, service)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await;
                    }
                }
            }
        });
    }
}

async fn answer(
    state: Arc<UpstreamState>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|collected| collected.to_bytes().to_vec())
        .unwrap_or_else(|error| format!("<body error: {error}>").into_bytes());
    let token = parts
        .headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::to_owned);
    let token_check = check_token(token.as_deref(), &state.public_pem);
    let seen = Seen {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        version: format!("{:?}", parts.version),
        authority: parts
            .headers
            .get(hyper::header::HOST)
            .and_then(|host| host.to_str().ok())
            .map(str::to_owned)
            .or_else(|| parts.uri.authority().map(ToString::to_string)),
        headers: parts
            .headers
            .iter()
            .map(|(name, value)| {
                (
                    name.to_string(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
        token,
        token_check,
    };
    let earlier = {
        let mut all = state.seen.lock().unwrap();
        let earlier = all.iter().filter(|other| other.path == seen.path).count();
        all.push(seen.clone());
        earlier
    };
    if seen.path.starts_with("/slow") {
        tokio::time::sleep(SLOW).await;
    }
    let unauthorized = seen.token_check.is_err()
        || seen.path.starts_with("/always-401")
        || (seen.path.starts_with("/unauthorized-once") && earlier == 0);
    let status = if unauthorized {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::OK
    };
    let echo = serde_json::json!({
        "method": seen.method,
        "path": seen.path,
        "query": seen.query,
        "version": seen.version,
        "authority": seen.authority,
        "headers": seen.headers,
        "body_len": seen.body.len(),
        "body_sha256": sha256(&seen.body),
        "token_check": match &seen.token_check {
            Ok(iat) => serde_json::json!({"iat": iat}),
            Err(error) => serde_json::json!({"error": error}),
        },
    });
    Ok(Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-upstream", "echo")
        .header("keep-alive", "timeout=5")
        .header("www-authenticate", "Bearer")
        .body(Full::new(Bytes::from(echo.to_string())))
        .expect("an echo response"))
}

/// Verifies a token the way Skykit API would: RS256 with the registered
/// public key, the issuer, and a lifetime of exactly [`LIFETIME`].
fn check_token(token: Option<&str>, public_pem: &str) -> Result<u64, String> {
    let token = token.ok_or("no `Authorization: Bearer` header")?;
    let key =
        DecodingKey::from_rsa_pem(public_pem.as_bytes()).map_err(|error| error.to_string())?;
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_issuer(&[ISSUER]);
    validation.set_required_spec_claims(&["iss", "iat", "exp"]);
    let claims = jsonwebtoken::decode::<Value>(token, &key, &validation)
        .map_err(|error| format!("the token does not verify: {error}"))?
        .claims;
    let (Some(iat), Some(exp)) = (claims["iat"].as_u64(), claims["exp"].as_u64()) else {
        return Err(format!("no integer iat and exp in {claims}"));
    };
    if exp - iat != LIFETIME {
        return Err(format!("exp - iat is {}, not {LIFETIME}", exp - iat));
    }
    Ok(iat)
}

fn sha256(bytes: &[u8]) -> String {
    digest::digest(&digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

// ---------------------------------------------------------------------------
// The client: raw HTTP/1.1, so every header and chunk is the test's choice.
// ---------------------------------------------------------------------------

/// What a request sends after its head.
enum Send<'a> {
    Nothing,
    /// With `Content-Length`.
    Sized(&'a [u8]),
    /// `Transfer-Encoding: chunked`, in chunks of at most this many bytes,
    /// flushed one by one.
    Chunked(&'a [u8], usize),
}

/// One parsed answer.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|error| panic!("the answer is not JSON ({error}): {self:?}"))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(header, _)| header.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    fn expect(self, status: u16) -> Reply {
        assert_eq!(
            self.status,
            status,
            "unexpected status; the answer:\n{}",
            self.text()
        );
        self
    }
}

/// Where the test reaches the proxy.
#[derive(Debug, Clone)]
enum Target {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl Target {
    fn connect(&self) -> Box<dyn ReadWrite> {
        match self {
            Target::Unix(path) => {
                let stream = UnixStream::connect(path)
                    .unwrap_or_else(|error| panic!("connect to {}: {error}", path.display()));
                stream
                    .set_read_timeout(Some(DEADLINE))
                    .expect("set a read timeout");
                Box::new(stream)
            }
            Target::Tcp(address) => {
                let stream = TcpStream::connect(address)
                    .unwrap_or_else(|error| panic!("connect to {address}: {error}"));
                stream
                    .set_read_timeout(Some(DEADLINE))
                    .expect("set a read timeout");
                Box::new(stream)
            }
        }
    }

    /// `Host` as curl would send it.
    fn host(&self) -> String {
        match self {
            Target::Unix(_) => "skykit".to_owned(),
            Target::Tcp(address) => address.to_string(),
        }
    }

    /// `METHOD TARGET` with `headers` (each `Name: value`) and `body`.
    fn request(&self, method: &str, target: &str, headers: &[&str], body: Send<'_>) -> Reply {
        exchange(self.connect(), method, target, &self.host(), headers, body)
    }

    fn get(&self, target: &str, headers: &[&str]) -> Reply {
        self.request("GET", target, headers, Send::Nothing)
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Sends one request with `Connection: close` and reads the whole answer.
fn exchange(
    mut stream: impl Read + Write,
    method: &str,
    target: &str,
    host: &str,
    headers: &[&str],
    body: Send<'_>,
) -> Reply {
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for header in headers {
        head.push_str(header);
        head.push_str("\r\n");
    }
    match &body {
        Send::Nothing => {}
        Send::Sized(bytes) => head.push_str(&format!("Content-Length: {}\r\n", bytes.len())),
        Send::Chunked(..) => head.push_str("Transfer-Encoding: chunked\r\n"),
    }
    head.push_str("\r\n");
    stream
        .write_all(head.as_bytes())
        .expect("send the request head");
    match body {
        Send::Nothing => {}
        Send::Sized(bytes) => stream.write_all(bytes).expect("send the body"),
        Send::Chunked(bytes, size) => {
            for chunk in bytes.chunks(size) {
                stream
                    .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                    .and_then(|()| stream.write_all(chunk))
                    .and_then(|()| stream.write_all(b"\r\n"))
                    .and_then(|()| stream.flush())
                    .expect("send a chunk");
            }
            stream.write_all(b"0\r\n\r\n").expect("end the chunks");
        }
    }
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .expect("read the answer (the proxy closes after it)");
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_owned(), value.trim().to_owned()))
        .collect();
    let rest = &raw[split + 4..];
    let chunked = headers.iter().any(|(name, value)| {
        name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked")
    });
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|window| window == b"\r\n")
            .expect("a chunk size line");
        let size_text = String::from_utf8_lossy(&rest[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or_else(|_| panic!("bad chunk size {size_text:?}"));
        rest = &rest[line_end + 2..];
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

// ---------------------------------------------------------------------------
// The agent under test.
// ---------------------------------------------------------------------------

/// Writes `config.toml`: one identity with the shared key, `[proxy]` with
/// `proxy` (TOML lines), then `extra`.
fn write_config(dir: &Dir, proxy: &str, extra: &str) -> PathBuf {
    let key = shared_key().write(dir, "private.pem");
    dir.write_mode(
        "config.toml",
        format!(
            "[[identity]]\nissuer = \"{ISSUER}\"\nkey = \"{}\"\n\n[proxy]\n{proxy}\n{extra}",
            key.display()
        ),
        0o644,
    )
}

/// `serve --socket <dir>/agent.sock --config CONFIG`.
fn serve_command(dir: &Dir, config: &Path) -> Command {
    let mut command = dir.command(&["serve", "--socket"]);
    command.arg(dir.socket()).arg("--config").arg(config);
    command
}

/// An agent whose proxy listens on `unix:proxy.sock` in `dir` and forwards
/// to `upstream`, with further `[proxy]` lines.
fn start_unix<'d>(dir: &'d Dir, upstream: &str, lines: &str) -> (Agent<'d>, Target) {
    let proxy = format!("listen = \"unix:proxy.sock\"\nupstream = \"{upstream}\"\n{lines}");
    start(dir, &proxy, "")
}

/// Starts an agent with `[proxy]` lines `proxy` and waits until its proxy
/// serves; returns where it listens.
fn start<'d>(dir: &'d Dir, proxy: &str, extra: &str) -> (Agent<'d>, Target) {
    let config = write_config(dir, proxy, extra);
    let agent = dir.start(serve_command(dir, &config));
    let listen = wait_for_log_field(&agent, "serving the proxy", "listen");
    let target = match listen.parse::<SocketAddr>() {
        Ok(address) => Target::Tcp(address),
        Err(_) => Target::Unix(PathBuf::from(listen)),
    };
    (agent, target)
}

/// The value of `field` in the first log line containing `message`,
/// waiting (within [`DEADLINE`]) for the line.
fn wait_for_log_field(agent: &Agent<'_>, message: &str, field: &str) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let stderr = agent.stderr();
        if let Some(line) = stderr.lines().find(|line| line.contains(message)) {
            return log_field(line, field)
                .unwrap_or_else(|| panic!("no {field}= in the log line {line:?}"));
        }
        assert!(
            Instant::now() < deadline,
            "the agent never logged {message:?}\n--- stderr ---\n{stderr}"
        );
        thread::sleep(POLL);
    }
}

/// The value of ` NAME=value` or ` NAME="value"` in a log line.
fn log_field(line: &str, name: &str) -> Option<String> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    let rest = &line[start..];
    match rest.strip_prefix('"') {
        Some(quoted) => quoted.split('"').next().map(str::to_owned),
        None => rest.split_whitespace().next().map(str::to_owned),
    }
}

/// The `proxied request` log lines.
fn request_lines(agent: &Agent<'_>) -> Vec<String> {
    agent
        .stderr()
        .lines()
        .filter(|line| line.contains("proxied request"))
        .map(str::to_owned)
        .collect()
}

/// `len` bytes that differ from chunk to chunk, so a lost or reordered
/// piece shows in the checksum.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 997) as u8).collect()
}

/// The value of header `name` in an echo.
fn echoed_header(echo: &Value, name: &str) -> Vec<String> {
    echo["headers"]
        .as_array()
        .expect("echoed headers")
        .iter()
        .filter(|pair| pair[0].as_str() == Some(name))
        .map(|pair| pair[1].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Asserts that the upstream got `body` intact and a token that verifies.
fn check_echo(echo: &Value, method: &str, path: &str, body: &[u8]) {
    assert_eq!(echo["method"], method, "{echo:#}");
    assert_eq!(echo["path"], path, "{echo:#}");
    assert_eq!(echo["body_len"], body.len(), "{echo:#}");
    assert_eq!(echo["body_sha256"], sha256(body), "{echo:#}");
    assert!(
        echo["token_check"]["iat"].is_u64(),
        "the upstream could not verify the token: {echo:#}"
    );
}

// ---------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------

#[test]
fn get_and_streamed_posts_reach_the_upstream_with_the_agents_token() {
    let dir = Dir::new();
    let upstream = Upstream::plain();
    let metrics = dir.join("metrics.sock");
    let (agent, proxy) = start(
        &dir,
        &format!(
            "listen = \"unix:proxy.sock\"\nupstream = \"{}\"",
            upstream.url()
        ),
        &format!("[metrics]\nlisten = \"unix:{}\"\n", metrics.display()),
    );
    assert!(matches!(proxy, Target::Unix(ref path) if path == &dir.join("proxy.sock")));
    let metrics_listen = wait_for_log_field(&agent, "serving metrics", "listen");
    assert_eq!(Path::new(&metrics_listen), metrics);

    // GET: method, path and query arrive as sent; Host names the upstream.
    let reply = proxy
        .get(
            "/sk-api/v1/devices?page=2&q=a%20b",
            &["Accept: application/json"],
        )
        .expect(200);
    let echo = reply.json();
    check_echo(&echo, "GET", "/sk-api/v1/devices", b"");
    assert_eq!(echo["query"], "page=2&q=a%20b");
    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(echo["authority"], upstream.address.to_string());
    assert_eq!(echoed_header(&echo, "accept"), ["application/json"]);
    // The upstream's own headers come back, hop-by-hop ones do not.
    assert_eq!(reply.header("x-upstream"), Some("echo"));
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.header("keep-alive"), None);
    let seen = upstream.seen("/sk-api/v1/devices");
    let token = seen[0].token.clone().expect("a bearer token");
    verify(&token, &shared_key().public_pem, ISSUER, LIFETIME);

    // POST bodies, chunked below and above the retry buffer, and one
    // above it with Content-Length: each arrives whole and in order.
    for (path, body, send) in [
        ("/small", payload(10_000), "chunked"),
        ("/large", payload(3 * BUFFER + 123), "chunked"),
        ("/sized", payload(BUFFER + 1), "sized"),
        ("/edge", payload(BUFFER), "chunked"),
    ] {
        let send_body = match send {
            "chunked" => Send::Chunked(&body, 8 * 1024),
            _ => Send::Sized(&body),
        };
        let reply = proxy
            .request(
                "POST",
                path,
                &["Content-Type: application/octet-stream"],
                send_body,
            )
            .expect(200);
        check_echo(&reply.json(), "POST", path, &body);
        assert_eq!(upstream.seen(path).len(), 1, "{path}: one request upstream");
    }
    assert!(
        upstream
            .all()
            .iter()
            .all(|seen| seen.token.as_deref() == Some(&token)),
        "every request carried the one cached token"
    );

    // One log line per request, without the query, the token or its
    // signature anywhere in the log.
    let lines = request_lines(&agent);
    assert_eq!(lines.len(), 5, "{lines:#?}");
    assert_eq!(log_field(&lines[0], "method").as_deref(), Some("GET"));
    assert_eq!(
        log_field(&lines[0], "path").as_deref(),
        Some("/sk-api/v1/devices")
    );
    assert_eq!(log_field(&lines[0], "status").as_deref(), Some("200"));
    assert_eq!(log_field(&lines[0], "uid").as_deref(), Some("0"));
    assert!(log_field(&lines[0], "duration_ms").is_some());
    let stderr = agent.stderr();
    assert!(
        !stderr.contains("page=2"),
        "the query was logged:\n{stderr}"
    );
    let signature = token.rsplit('.').next().expect("a JWS signature");
    assert!(
        !stderr.contains(signature) && !stderr.contains(&token),
        "the token reached the log:\n{stderr}"
    );

    // Metrics count the requests by status class.
    let text = Target::Unix(metrics)
        .get("/metrics", &[])
        .expect(200)
        .text();
    assert!(
        text.contains("skykit_agent_proxy_requests_total{status_class=\"2xx\"} 5"),
        "{text}"
    );
    assert!(
        text.contains("skykit_agent_proxy_request_seconds_count 5"),
        "{text}"
    );
}

#[test]
fn the_clients_credentials_and_hop_by_hop_headers_stay_on_this_side() {
    let dir = Dir::new();
    let upstream = Upstream::plain();
    let (_agent, proxy) = start_unix(&dir, &upstream.url(), "");
    let reply = proxy
        .get(
            "/headers",
            &[
                "Authorization: Bearer the-clients-own-token",
                "Connection: X-Hop",
                "X-Hop: listed in Connection",
                "Keep-Alive: timeout=5",
                "Proxy-Authorization: Basic dXNlcjpwYXNz",
                "Proxy-Connection: keep-alive",
                "TE: trailers",
                "Trailer: X-Checksum",
                "Upgrade: websocket",
                "Skykit-Agent-Proxy: true",
                "X-Custom: one",
                "X-Custom: two",
                "User-Agent: proxy-test",
            ],
        )
        .expect(200);
    let echo = reply.json();
    check_echo(&echo, "GET", "/headers", b"");
    let names: Vec<&str> = echo["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| pair[0].as_str().unwrap())
        .collect();
    for gone in [
        "connection",
        "x-hop",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "skykit-agent-proxy",
    ] {
        assert!(!names.contains(&gone), "{gone} was forwarded: {echo:#}");
    }
    assert_eq!(echoed_header(&echo, "x-custom"), ["one", "two"]);
    assert_eq!(echoed_header(&echo, "user-agent"), ["proxy-test"]);
    assert_eq!(echoed_header(&echo, "host"), [upstream.address.to_string()]);
    let authorization = echoed_header(&echo, "authorization");
    assert_eq!(
        authorization.len(),
        1,
        "exactly one Authorization: {echo:#}"
    );
    let token = authorization[0]
        .strip_prefix("Bearer ")
        .expect("a bearer token");
    assert_ne!(token, "the-clients-own-token");
    verify(token, &shared_key().public_pem, ISSUER, LIFETIME);
}

#[test]
fn a_401_is_retried_once_with_a_newly_signed_token() {
    let dir = Dir::new();
    let upstream = Upstream::plain();
    let (agent, proxy) = start_unix(&dir, &upstream.url(), "retry_min_token_age = \"0s\"");

    let reply = proxy.get("/unauthorized-once/get", &[]).expect(200);
    check_echo(&reply.json(), "GET", "/unauthorized-once/get", b"");
    let seen = upstream.seen("/unauthorized-once/get");
    assert_eq!(seen.len(), 2, "the 401 and the retry");
    let first = seen[0].token.clone().expect("the first request's token");
    let second = seen[1].token.clone().expect("the retry's token");
    let first_claims = verify(&first, &shared_key().public_pem, ISSUER, LIFETIME);
    let second_claims = verify(&second, &shared_key().public_pem, ISSUER, LIFETIME);
    assert_ne!(first, second, "the retry must carry a new token");
    assert!(
        second_claims.iat > first_claims.iat,
        "the new token is signed later: {first_claims:?} then {second_claims:?}"
    );
    assert_eq!(
        log_field(&request_lines(&agent)[0], "retried").as_deref(),
        Some("true")
    );

    // A buffered body is sent again whole.
    let body = payload(20_000);
    let reply = proxy
        .request(
            "POST",
            "/unauthorized-once/post",
            &[],
            Send::Chunked(&body, 4096),
        )
        .expect(200);
    check_echo(&reply.json(), "POST", "/unauthorized-once/post", &body);
    let seen = upstream.seen("/unauthorized-once/post");
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter().all(|seen| seen.body == body),
        "both attempts carried the body"
    );

    // A body beyond the buffer was streamed once and cannot be sent again:
    // the client gets the 401 as it was.
    let large = payload(BUFFER + 1);
    let reply = proxy
        .request(
            "POST",
            "/unauthorized-once/large",
            &[],
            Send::Chunked(&large, 8192),
        )
        .expect(401);
    assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
    assert_eq!(upstream.seen("/unauthorized-once/large").len(), 1);

    // The upstream refusing the new token too is not retried again.
    proxy.get("/always-401", &[]).expect(401);
    assert_eq!(upstream.seen("/always-401").len(), 2, "one retry, no more");
}

#[test]
fn a_401_for_a_young_token_is_passed_on() {
    let dir = Dir::new();
    let upstream = Upstream::plain();
    // The default retry_min_token_age, 60 s: a token just signed is not
    // the problem, so signing another would not help.
    let (agent, proxy) = start_unix(&dir, &upstream.url(), "");
    proxy.get("/unauthorized-once/young", &[]).expect(401);
    assert_eq!(upstream.seen("/unauthorized-once/young").len(), 1);
    assert_eq!(
        log_field(&request_lines(&agent)[0], "retried").as_deref(),
        Some("false")
    );
}

#[test]
fn the_tcp_listener_needs_the_header_and_a_loopback_host() {
    let dir = Dir::new();
    let upstream = Upstream::plain();
    let (agent, proxy) = start(
        &dir,
        &format!(
            "listen = \"127.0.0.1:0\"\nupstream = \"{}\"\nallow_any_local_user = true",
            upstream.url()
        ),
        "",
    );
    let Target::Tcp(address) = proxy else {
        panic!("the proxy should listen on TCP, not {proxy:?}");
    };
    assert!(address.ip().is_loopback() && address.port() != 0);
    assert!(
        agent
            .stderr()
            .lines()
            .any(|line| line.contains(" WARN ") && line.contains("allow_any_local_user = true")),
        "no start-up warning:\n{}",
        agent.stderr()
    );

    let refused = proxy.get("/tcp/without-header", &[]).expect(403);
    assert!(
        refused.text().contains("Skykit-Agent-Proxy: true"),
        "{}",
        refused.text()
    );
    proxy
        .get("/tcp/wrong-value", &["Skykit-Agent-Proxy: yes"])
        .expect(403);
    assert!(
        upstream.all().is_empty(),
        "refused requests never go upstream"
    );

    let reply = proxy
        .get("/tcp/with-header", &["Skykit-Agent-Proxy: true"])
        .expect(200);
    let echo = reply.json();
    check_echo(&echo, "GET", "/tcp/with-header", b"");
    assert!(echoed_header(&echo, "skykit-agent-proxy").is_empty());

    // A page that rebinds its own name to 127.0.0.1 still sends that name.
    let rebound = exchange(
        proxy.connect(),
        "GET",
        "/tcp/rebound",
        &format!("evil.example:{}", address.port()),
        &["Skykit-Agent-Proxy: true"],
        Send::Nothing,
    )
    .expect(403);
    assert!(
        rebound.text().contains("loopback Host"),
        "{}",
        rebound.text()
    );
    assert_eq!(upstream.all().len(), 1);
}

#[test]
fn a_tcp_listener_without_allow_any_local_user_is_a_config_error() {
    let dir = Dir::new();
    let config = write_config(&dir, "listen = \"127.0.0.1:0\"", "");
    let output = run(serve_command(&dir, &config));
    assert_exit(
        &output,
        EXIT_CONFIG,
        &[
            "config.toml:5:",
            "allow_any_local_user = true",
            "127.0.0.1:0",
        ],
    );
    let output = dir.run(&["check", "--config", config.to_str().unwrap()]);
    assert_exit(&output, EXIT_CONFIG, &["allow_any_local_user"]);

    // Other bad values are reported together, each with its line.
    let config = write_config(
        &dir,
        "listen = \"10.0.0.1:80\"\nupstream = \"http://skykit.example\"\ntimeout = \"0s\"\nidentity = \"nobody\"\ncolour = 1",
        "",
    );
    let output = run(serve_command(&dir, &config));
    assert_exit(
        &output,
        EXIT_CONFIG,
        &[
            "config.toml:6: proxy `listen` 10.0.0.1:80 is not a loopback address",
            "config.toml:7: proxy `upstream` \"http://skykit.example\" is plain http",
            "config.toml:8: `timeout` must be at least 1s",
            "config.toml:10: unknown key `colour` in [proxy]",
        ],
    );
}

#[test]
fn a_proxy_that_cannot_listen_stops_the_start() {
    let dir = Dir::new();
    dir.write("proxy.sock", "not a socket");
    let config = write_config(&dir, "listen = \"unix:proxy.sock\"", "");
    let output = run(serve_command(&dir, &config));
    assert_exit(
        &output,
        1,
        &[
            "cannot start the proxy ([proxy] in the config)",
            "is a regular file",
        ],
    );
    assert!(
        !dir.socket().exists(),
        "the agent's socket is removed again"
    );
    assert_eq!(
        fs::read_to_string(dir.join("proxy.sock")).unwrap(),
        "not a socket"
    );
}

#[test]
fn the_identitys_policy_refuses_other_users_on_the_unix_socket() {
    require_root("connect to the proxy as uid 65534");
    let dir = Dir::new();
    // uid 65534 may reach the socket, so only the policy can refuse it.
    chmod(dir.path(), 0o755);
    let upstream = Upstream::plain();
    let (agent, proxy) = start(
        &dir,
        &format!(
            "listen = \"unix:proxy.sock\"\nupstream = \"{}\"",
            upstream.url()
        ),
        "",
    );
    let Target::Unix(path) = &proxy else {
        panic!("a Unix socket");
    };
    // socket_mode applies to the proxy's socket as to the agent's: 0600.
    assert_eq!(mode(path), 0o600);
    chmod(path, 0o666);

    let stream = connect_as_nobody(path, &[]);
    stream
        .set_read_timeout(Some(DEADLINE))
        .expect("a read timeout");
    let reply = exchange(stream, "GET", "/policy", "skykit", &[], Send::Nothing).expect(403);
    assert!(
        reply
            .text()
            .contains("uid 65534 may not use identity \"default\""),
        "{}",
        reply.text()
    );
    assert!(
        upstream.all().is_empty(),
        "a refused request never goes upstream"
    );
    let audit = agent
        .stderr()
        .lines()
        .find(|line| {
            line.contains("skykit_agent::audit")
                && log_field(line, "decision").as_deref() == Some("deny")
        })
        .map(str::to_owned);
    let audit = audit.unwrap_or_else(|| panic!("no deny audit line:\n{}", agent.stderr()));
    assert_eq!(log_field(&audit, "uid").as_deref(), Some("65534"));
    let line = request_lines(&agent).pop().expect("a request log line");
    assert_eq!(log_field(&line, "status").as_deref(), Some("403"));
    assert_eq!(log_field(&line, "uid").as_deref(), Some("65534"));

    // Root, whom the default policy admits, gets through.
    check_echo(
        &proxy.get("/policy", &[]).expect(200).json(),
        "GET",
        "/policy",
        b"",
    );
}

#[test]
fn an_unreachable_upstream_is_502_with_the_reason() {
    let dir = Dir::new();
    // A port that was free a moment ago and has no listener now.
    let closed = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("find a free port");
    let (agent, proxy) = start_unix(&dir, &format!("http://{closed}"), "");
    let reply = proxy.get("/sk-api/v1/devices", &[]).expect(502);
    let text = reply.text();
    assert!(
        text.starts_with("skykit-agent proxy: cannot reach the upstream")
            && text.contains("refused"),
        "{text}"
    );
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    // The agent keeps serving: tokens over gRPC and the proxy alike.
    agent.grpc().ok(request("", None, None));
    proxy.get("/again", &[]).expect(502);
}

#[test]
fn a_slow_upstream_is_504_after_the_timeout() {
    let dir = Dir::new();
    let upstream = Upstream::plain();
    let (_agent, proxy) = start_unix(&dir, &upstream.url(), "timeout = \"1s\"");
    let started = Instant::now();
    let reply = proxy.get("/slow", &[]).expect(504);
    let elapsed = started.elapsed();
    assert!(
        reply.text().contains("did not answer within 1s"),
        "{}",
        reply.text()
    );
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < SLOW,
        "answered after {elapsed:?}"
    );
    assert_eq!(upstream.seen("/slow").len(), 1);
    // Later requests are not held up by the abandoned one.
    check_echo(
        &proxy.get("/fast", &[]).expect(200).json(),
        "GET",
        "/fast",
        b"",
    );
}

#[test]
fn tls_to_the_upstream_trusts_ca_file_and_speaks_http2() {
    let dir = Dir::new();
    let (upstream, ca_file) = Upstream::tls(&dir);
    let url = format!("https://127.0.0.1:{}", upstream.address.port());
    let (_agent, proxy) = start_unix(&dir, &url, &format!("ca_file = \"{}\"", ca_file.display()));
    let echo = proxy.get("/tls/get?x=1", &[]).expect(200).json();
    check_echo(&echo, "GET", "/tls/get", b"");
    assert_eq!(echo["version"], "HTTP/2.0", "ALPN chose HTTP/2: {echo:#}");
    assert_eq!(echo["query"], "x=1");
    assert_eq!(
        echo["authority"],
        format!("127.0.0.1:{}", upstream.address.port())
    );
    let body = payload(2 * BUFFER);
    let echo = proxy
        .request("POST", "/tls/post", &[], Send::Chunked(&body, 16 * 1024))
        .expect(200)
        .json();
    check_echo(&echo, "POST", "/tls/post", &body);

    // Without the test CA the certificate is not trusted: 502, saying so.
    let other = Dir::new();
    let (_agent, proxy) = start_unix(&other, &url, "");
    let reply = proxy.get("/tls/untrusted", &[]).expect(502);
    assert!(reply.text().contains("certificate"), "{}", reply.text());
    assert!(upstream.seen("/tls/untrusted").is_empty());
}

// ---------------------------------------------------------------------------
// The systemd drop-in.
// ---------------------------------------------------------------------------

/// `systemd-analyze security --offline=true` for the unit with
/// network.conf on systemd 252, as recorded in the drop-in and the README.
const RECORDED_EXPOSURE: f64 = 1.3;

#[test]
fn network_drop_in_verifies_and_keeps_its_recorded_exposure() {
    let dir = Dir::new();
    let (socket, service, drop_in) = units_with_drop_in(&dir, "network.conf");
    assert_silent_success(
        &systemd_verify(&dir, false, &[&socket, &service]),
        "systemd-analyze verify of the service with network.conf",
    );
    let settings = fs::read_to_string(&drop_in).expect("read the drop-in");
    for line in [
        "PrivateNetwork=no",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "IPAddressAllow=any",
    ] {
        assert!(
            settings.lines().any(|setting| setting == line),
            "network.conf lacks {line:?}:\n{settings}"
        );
    }
    let security = systemd_security(&dir, &service);
    let stdout = String::from_utf8_lossy(&security.stdout);
    // The drop-in is really read: the network settings show up as exposed.
    assert!(
        stdout.contains("PrivateNetwork=") && stdout.contains("AF_(INET|INET6)"),
        "{}",
        describe(&security)
    );
    let exposure = overall_exposure(&security);
    assert!(
        (exposure - RECORDED_EXPOSURE).abs() < 1e-9,
        "the exposure with network.conf is {exposure}, not the recorded {RECORDED_EXPOSURE}: update the drop-in and the README\n{}",
        describe(&security)
    );
    let recorded = format!("overall exposure {RECORDED_EXPOSURE}");
    assert!(
        settings.contains(&recorded),
        "network.conf does not record {recorded:?}:\n{settings}"
    );
    let readme = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("read the README");
    let recorded = format!("rates the exposure {RECORDED_EXPOSURE} (OK)");
    assert!(
        readme.contains(&recorded),
        "the README does not record {recorded:?}"
    );
}

#[test]
fn on_sigterm_a_proxied_request_in_flight_finishes_and_idle_connections_close() {
    let dir = Dir::new();
    let upstream = Upstream::plain();
    let (mut agent, proxy) = start_unix(&dir, &upstream.url(), "timeout = \"30s\"");
    let in_flight = {
        let proxy = proxy.clone();
        thread::spawn(move || proxy.get("/slow", &[]))
    };
    let deadline = Instant::now() + DEADLINE;
    while upstream.seen("/slow").is_empty() {
        assert!(
            Instant::now() < deadline,
            "the request never reached the upstream"
        );
        thread::sleep(POLL);
    }
    let mut idle = proxy.connect();
    let signalled = Instant::now();
    agent.signal(Signal::TERM);
    // An idle connection is closed at once, not at the drain deadline.
    let mut byte = [0u8; 1];
    assert_eq!(idle.read(&mut byte).expect("read the idle connection"), 0);
    assert!(
        signalled.elapsed() < SLOW,
        "closed after {:?}",
        signalled.elapsed()
    );
    // The request in flight gets its answer.
    check_echo(
        &in_flight.join().unwrap().expect(200).json(),
        "GET",
        "/slow",
        b"",
    );
    let Target::Unix(socket) = &proxy else {
        unreachable!("start_unix listens on a Unix socket")
    };
    assert!(
        UnixStream::connect(socket).is_err(),
        "a stopping proxy still takes new connections"
    );
    assert!(agent.wait().success(), "{}", agent.stderr());
    let stderr = agent.stderr();
    assert!(
        stderr.contains("proxy: stopped accepting; finishing the requests in flight"),
        "{stderr}"
    );
    assert!(!stderr.contains("drain deadline passed"), "{stderr}");
}

#[test]
fn proxy_connections_beyond_max_connections_wait_until_one_closes() {
    let dir = Dir::new();
    let upstream = Upstream::plain();
    let proxy_lines = format!(
        "listen = \"unix:proxy.sock\"\nupstream = \"{}\"",
        upstream.url()
    );
    let (_agent, proxy) = start(&dir, &proxy_lines, "[limits]\nmax_connections = 2\n");
    // Two connections hold both slots (the header read timeout is 10 s).
    let first = proxy.connect();
    let _second = proxy.connect();
    let waiting = {
        let proxy = proxy.clone();
        thread::spawn(move || proxy.get("/third", &[]))
    };
    thread::sleep(Duration::from_millis(500));
    assert!(
        upstream.seen("/third").is_empty(),
        "a third connection was served while two were open"
    );
    drop(first);
    check_echo(
        &waiting.join().unwrap().expect(200).json(),
        "GET",
        "/third",
        b"",
    );
}
