//! The bad-input rows of `docs/RELIABILITY.md` that no other module
//! proves: malformed gRPC and raw bytes on the socket, the per-uid
//! signature budget, every config error at startup and on SIGHUP, key
//! errors on SIGHUP, and socket paths the agent cannot use.
//!
//! Every runtime case ends by showing that the same agent still serves a
//! token that verifies. The helpers in the first section are shared with
//! `faults.rs`.

use std::{
    fs,
    future::Future as _,
    io::{Read, Write},
    os::unix::{fs::MetadataExt, net::UnixStream},
    path::{Path, PathBuf},
    pin::Pin,
    process::Command,
    task::{Context, Poll},
    thread,
    time::{Duration, Instant},
};

use prost::bytes::{Buf, BufMut};
use rustix::process::Signal;
use skykit_agent::proto::{
    GetStatusRequest, GetStatusResponse, GetTokenRequest, GetTokenResponse,
    agent_service_client::AgentServiceClient, token_service_client::TokenServiceClient,
};
use tokio::sync::oneshot;
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http,
    transport::Channel,
};

use crate::support::*;

// ---------------------------------------------------------------------------
// Helpers, shared with faults.rs.
// ---------------------------------------------------------------------------

/// How often the polling loops look again.
pub const POLL: Duration = Duration::from_millis(10);
/// The gRPC path of GetToken.
pub const GET_TOKEN: &str = "/skykit.agent.v1.TokenService/GetToken";
/// The 24-byte HTTP/2 client preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: what a client sends right after the preface.
pub const EMPTY_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

/// A path as a `&str`, for argument lists.
pub fn text(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// Writes `[limits]` with `settings` (one `name = value` per line) to
/// `limits.toml`, for `serve --config`.
pub fn limits_config(dir: &Dir, settings: &str) -> PathBuf {
    dir.write("limits.toml", format!("[limits]\n{settings}"))
}

/// Starts an agent on the shared key with `[limits]` `settings`.
pub fn serve_with_limits<'d>(dir: &'d Dir, settings: &str) -> Agent<'d> {
    let config = limits_config(dir, settings);
    let key = shared_key().write(dir, "private.pem");
    dir.start(dir.serve_command(&key, &["--config", text(&config)]))
}

/// The agent's pid, as the kernel reports it to a client of its socket.
pub fn agent_pid(socket: &Path) -> u32 {
    let stream = UnixStream::connect(socket)
        .unwrap_or_else(|error| panic!("connect to {}: {error}", socket.display()));
    let credentials = rustix::net::sockopt::socket_peercred(&stream).expect("SO_PEERCRED");
    credentials.pid.as_raw_nonzero().get() as u32
}

/// Asserts that the agent still runs (the same pid answers on its socket)
/// and serves a token, on a new connection, that verifies with `key`.
pub fn assert_still_serves(agent: &Agent<'_>, pid: u32, key: &TestKey) {
    assert_eq!(
        agent_pid(agent.socket()),
        pid,
        "another process answers on the socket"
    );
    let response = Grpc::connect(agent.socket())
        .get_token(request("", Some(900), None))
        .unwrap_or_else(|status| {
            panic!(
                "the agent no longer serves: {status:?}\n--- stderr ---\n{}",
                agent.stderr()
            )
        });
    check_response(&response, key, "default", 900);
}

/// Polls `condition` until it holds; fails naming `what` after [`DEADLINE`].
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: not within {DEADLINE:?}");
        thread::sleep(POLL);
    }
}

/// Polls the agent's stderr until it contains `needle`.
pub fn wait_for_log(agent: &Agent<'_>, needle: &str) {
    let deadline = Instant::now() + DEADLINE;
    while !agent.stderr().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the agent's log within {DEADLINE:?}\n--- stderr ---\n{}",
            agent.stderr()
        );
        thread::sleep(POLL);
    }
}

/// A multi-threaded runtime, so connections keep answering pings while
/// the test thread waits.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build a tokio runtime")
}

/// A new connection (one HTTP/2 connection per channel) to the agent.
pub async fn channel(socket: &Path) -> Channel {
    skykit_agent::client::channel(socket)
        .await
        .unwrap_or_else(|error| panic!("cannot connect to {}: {error}", socket.display()))
}

/// The agent's `GetStatus`, on a connection of its own.
pub async fn status(socket: &Path) -> GetStatusResponse {
    AgentServiceClient::new(channel(socket).await)
        .get_status(GetStatusRequest {})
        .await
        .unwrap_or_else(|status| panic!("GetStatus failed: {status:?}"))
        .into_inner()
}

/// Passes message bytes through untouched, so a test can send any bytes
/// as a gRPC message (tonic still frames them).
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut bytes = vec![0; src.remaining()];
        src.copy_to_slice(&mut bytes);
        Ok(Some(bytes))
    }
}

/// A unary call of `path` whose message is `body` as is, with `metadata`.
pub async fn raw_call(
    channel: &Channel,
    path: &'static str,
    body: Vec<u8>,
    metadata: &[(&'static str, String)],
) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|error| Status::unavailable(error.to_string()))?;
    let mut request = tonic::Request::new(body);
    for (name, value) in metadata {
        request
            .metadata_mut()
            .insert(*name, value.parse().expect("an ASCII metadata value"));
    }
    grpc.unary(
        request,
        http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// What an HTTP/2 request got: the HTTP status, and `grpc-status` and
/// `grpc-message` from the headers (a trailers-only answer) or trailers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpReply {
    pub http_status: u16,
    pub grpc_status: Option<i32>,
    pub grpc_message: String,
}

/// A POST of `path` with exactly `headers` and `body` (gRPC framing
/// included), for what tonic's client would not send: a frame flagged
/// compressed, a frame longer than its body, or no frame at all.
pub async fn http_call(
    channel: &Channel,
    path: &str,
    headers: &[(&str, String)],
    body: String,
) -> HttpReply {
    use tonic::codegen::{Body as _, Service as _};
    let mut channel = channel.clone();
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .expect("the channel is ready");
    let mut builder = http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{path}"));
    for (name, value) in headers {
        builder = builder.header(*name, value);
    }
    let request = builder
        .body(tonic::body::Body::new(body))
        .expect("a valid request");
    let response = channel
        .call(request)
        .await
        .unwrap_or_else(|error| panic!("the HTTP/2 request to {path} failed: {error:?}"));
    let (parts, mut body) = response.into_parts();
    let mut fields = parts.headers;
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.unwrap_or_else(|error| panic!("reading the answer body: {error:?}"));
        if let Ok(trailers) = frame.into_trailers() {
            fields.extend(trailers);
        }
    }
    let field = |name: &str| {
        fields
            .get(name)
            .map(|value| value.to_str().expect("an ASCII header").to_owned())
    };
    HttpReply {
        http_status: parts.status.as_u16(),
        grpc_status: field("grpc-status").map(|code| code.parse().expect("a numeric grpc-status")),
        grpc_message: percent_decode(&field("grpc-message").unwrap_or_default()),
    }
}

/// The headers every gRPC request carries, plus `extra`.
pub fn grpc_headers<'a>(extra: &[(&'a str, &str)]) -> Vec<(&'a str, String)> {
    let mut headers = vec![
        ("content-type", "application/grpc".to_owned()),
        ("te", "trailers".to_owned()),
    ];
    headers.extend(
        extra
            .iter()
            .map(|(name, value)| (*name, (*value).to_owned())),
    );
    headers
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%'
            && index + 2 < bytes.len()
            && let Ok(byte) = u8::from_str_radix(&text[index + 1..index + 3], 16)
        {
            out.push(byte);
            index += 3;
            continue;
        }
        out.push(bytes[index]);
        index += 1;
    }
    String::from_utf8(out).expect("a UTF-8 grpc-message")
}

/// One gRPC frame of `payload`: the compressed flag, the big-endian
/// length `declared`, then the payload (all ASCII here, so it fits a
/// `String` body).
pub fn frame(compressed: bool, declared: u8, payload: &str) -> String {
    let mut frame = String::from(if compressed { '\u{1}' } else { '\0' });
    frame.push_str("\0\0\0");
    assert!(declared < 0x80, "the length byte must stay ASCII");
    frame.push(char::from(declared));
    frame.push_str(payload);
    frame
}

/// A request stream that yields `request` only once `release` fires (and
/// never, if it is dropped): the call stays in flight on the agent, its
/// HEADERS received and its message not, for as long as the test wants.
pub struct Deferred {
    release: Option<oneshot::Receiver<()>>,
    request: Option<GetTokenRequest>,
}

impl futures_core::Stream for Deferred {
    type Item = GetTokenRequest;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(release) = self.release.as_mut() {
            match Pin::new(release).poll(cx) {
                Poll::Ready(Ok(())) => self.release = None,
                // Released never: the message never comes.
                Poll::Ready(Err(_)) | Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(self.request.take())
    }
}

/// A GetToken whose message is sent only when `release` fires.
pub async fn deferred_get_token(
    channel: Channel,
    release: oneshot::Receiver<()>,
) -> Result<GetTokenResponse, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|error| Status::unavailable(error.to_string()))?;
    let stream = Deferred {
        release: Some(release),
        request: Some(request("", None, None)),
    };
    grpc.client_streaming(
        tonic::Request::new(stream),
        http::uri::PathAndQuery::from_static(GET_TOKEN),
        tonic_prost::ProstCodec::default(),
    )
    .await
    .map(tonic::Response::into_inner)
}

/// The task of a deferred call.
pub type DeferredCall = tokio::task::JoinHandle<Result<GetTokenResponse, Status>>;

/// Starts `count` deferred GetToken calls on `channel`, strictly in order:
/// each is polled once here, which hands its request to the connection,
/// before the next starts. HTTP/2 keeps a connection's frames in order, so
/// a call made afterwards on the same connection reaches the agent after
/// them. Returns the handles that release each call's message, and tasks.
pub fn start_deferred(
    runtime: &tokio::runtime::Runtime,
    channel: &Channel,
    count: usize,
) -> (Vec<oneshot::Sender<()>>, Vec<DeferredCall>) {
    runtime.block_on(async {
        let mut releases = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..count {
            let (release, released) = oneshot::channel();
            releases.push(release);
            let mut call = Box::pin(deferred_get_token(channel.clone(), released));
            let first = std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await;
            tasks.push(match first {
                Poll::Ready(result) => tokio::spawn(async move { result }),
                Poll::Pending => tokio::spawn(call),
            });
        }
        (releases, tasks)
    })
}

/// Asserts `result` failed with `code` and a message containing `needle`.
pub fn assert_status<T: std::fmt::Debug>(
    result: Result<T, Status>,
    code: Code,
    needle: &str,
    what: &str,
) {
    match result {
        Ok(value) => panic!("{what} succeeded: {value:?}"),
        Err(status) => assert!(
            status.code() == code && status.message().contains(needle),
            "{what}: expected {code:?} with a message containing {needle:?}, got {status:?}"
        ),
    }
}

/// Sends `bytes` on a new raw connection and reads until the agent closes
/// it (within [`DEADLINE`]); returns what the agent sent.
pub fn send_raw_until_closed(socket: &Path, bytes: &[u8]) -> Vec<u8> {
    let mut stream = UnixStream::connect(socket).expect("connect to the agent");
    stream
        .set_read_timeout(Some(DEADLINE))
        .expect("set a read timeout");
    stream.write_all(bytes).expect("send the bytes");
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return received,
            Ok(length) => received.extend_from_slice(&buffer[..length]),
            // The agent closed with our bytes unread: the kernel resets.
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => return received,
            Err(error) => panic!(
                "the agent did not close the connection within {DEADLINE:?}: {error} (received {received:?})"
            ),
        }
    }
}

/// The HTTP/2 frame types (the 4th byte of each 9-byte header) in `bytes`.
pub fn frame_types(bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 9 {
        let length = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        types.push(rest[3]);
        rest = &rest[(9 + length).min(rest.len())..];
    }
    types
}

/// The HTTP/2 SETTINGS frame type.
pub const SETTINGS: u8 = 4;

// ---------------------------------------------------------------------------
// 1. Requests.
// ---------------------------------------------------------------------------

#[test]
fn invalid_request_values_are_refused_and_the_agent_keeps_serving() {
    let dir = Dir::new();
    let agent = dir.serve(&shared_key().write(&dir, "private.pem"));
    let pid = agent_pid(agent.socket());
    let mut grpc = agent.grpc();
    let half_second = |seconds| prost_types::Duration {
        seconds,
        nanos: 500_000_000,
    };
    let cases = [
        (
            request("nobody-here", None, None),
            Code::NotFound,
            "unknown identity \"nobody-here\": use a name from the agent's [[identity]] config",
        ),
        (
            request("", Some(i64::MAX), None),
            Code::InvalidArgument,
            "lifetime 9223372036854775807s is over the maximum of 3600s",
        ),
        (
            request("", Some(i64::MIN), None),
            Code::InvalidArgument,
            "lifetime -9223372036854775808s is under the minimum of 60s",
        ),
        (
            request("", Some(600), Some(-1)),
            Code::InvalidArgument,
            "min_valid_for -1s is negative",
        ),
        (
            request("", Some(600), Some(i64::MAX)),
            Code::InvalidArgument,
            "min_valid_for 9223372036854775807s is longer than the token's lifetime 600s",
        ),
        (
            GetTokenRequest {
                lifetime: Some(half_second(600)),
                ..request("", None, None)
            },
            Code::InvalidArgument,
            "lifetime must be whole seconds, but has 500000000 nanoseconds",
        ),
        (
            GetTokenRequest {
                min_valid_for: Some(half_second(60)),
                ..request("", Some(600), None)
            },
            Code::InvalidArgument,
            "min_valid_for must be whole seconds, but has 500000000 nanoseconds",
        ),
    ];
    for (request, code, message) in cases {
        let what = format!("{request:?}");
        assert_status(grpc.get_token(request), code, message, &what);
    }
    assert_still_serves(&agent, pid, shared_key());
}

#[test]
fn malformed_grpc_messages_get_a_status_and_the_connection_keeps_serving() {
    let dir = Dir::new();
    let agent = dir.serve(&shared_key().write(&dir, "private.pem"));
    let pid = agent_pid(agent.socket());
    let socket = agent.socket().to_owned();
    let runtime = runtime();
    runtime.block_on(async {
        let channel = channel(&socket).await;
        // Random bytes (a fixed seed): not a GetTokenRequest.
        let garbage: Vec<u8> = (0u32..64)
            .map(|index| (index.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        assert_status(
            raw_call(&channel, GET_TOKEN, garbage, &[]).await,
            Code::Internal,
            "failed to decode Protobuf message",
            "random bytes as the message",
        );
        // A 20 KiB identity: over the 16 KiB message limit.
        let big = prost::Message::encode_to_vec(&GetTokenRequest {
            identity: "x".repeat(20 * 1024),
            ..GetTokenRequest::default()
        });
        assert_status(
            raw_call(&channel, GET_TOKEN, big, &[]).await,
            Code::OutOfRange,
            "decoded message length too large: found 20484 bytes, the limit is: 16384 bytes",
            "a 20 KiB message",
        );
        // Exactly 16384 bytes is decoded: an empty request plus an
        // unknown field (number 15, 16381 bytes), which protobuf skips.
        let mut at_limit = vec![(15 << 3) | 2];
        prost::encoding::encode_varint(16_381, &mut at_limit);
        at_limit.resize(16 * 1024, b'x');
        let response = raw_call(&channel, GET_TOKEN, at_limit, &[])
            .await
            .expect("a message of exactly 16 KiB");
        let response: GetTokenResponse =
            prost::Message::decode(response.as_slice()).expect("a GetTokenResponse");
        check_response(&response, shared_key(), "default", 3600);
        for path in [
            "/skykit.agent.v1.TokenService/NoSuchMethod",
            "/skykit.agent.v1.NoSuchService/GetToken",
        ] {
            assert_status(
                raw_call(&channel, path, Vec::new(), &[]).await,
                Code::Unimplemented,
                "",
                path,
            );
        }

        let cases = [
            (
                "a gzip-compressed message",
                grpc_headers(&[("grpc-encoding", "gzip")]),
                frame(true, 5, "hello"),
                Code::Unimplemented,
                "Content is compressed with `gzip` which isn't supported",
            ),
            (
                "a message flagged compressed without grpc-encoding",
                grpc_headers(&[]),
                frame(true, 5, "hello"),
                Code::Internal,
                "received message with compressed-flag but no grpc-encoding was specified",
            ),
            (
                "a frame declaring 80 bytes and carrying 5",
                grpc_headers(&[]),
                frame(false, 80, "hello"),
                Code::Internal,
                "Unexpected EOF decoding stream.",
            ),
            (
                "a request without any message",
                grpc_headers(&[]),
                String::new(),
                Code::Internal,
                "Missing request message.",
            ),
        ];
        for (what, headers, body, code, message) in cases {
            let reply = http_call(&channel, GET_TOKEN, &headers, body).await;
            assert!(
                reply.http_status == 200
                    && reply.grpc_status == Some(code as i32)
                    && reply.grpc_message.contains(message),
                "{what}: expected grpc-status {code:?} with {message:?}, got {reply:?}"
            );
        }

        // The same connection still answers.
        let response = TokenServiceClient::new(channel.clone())
            .get_token(request("", None, None))
            .await
            .expect("GetToken on the same connection")
            .into_inner();
        check_response(&response, shared_key(), "default", 3600);
    });
    assert_still_serves(&agent, pid, shared_key());
}

#[test]
fn metadata_over_8_kib_is_refused_with_http_431() {
    let dir = Dir::new();
    let agent = dir.serve(&shared_key().write(&dir, "private.pem"));
    let pid = agent_pid(agent.socket());
    let socket = agent.socket().to_owned();
    runtime().block_on(async {
        let channel = channel(&socket).await;
        let padding = "a".repeat(9 * 1024);
        let reply = http_call(
            &channel,
            GET_TOKEN,
            &grpc_headers(&[("x-padding", &padding)]),
            frame(false, 0, ""),
        )
        .await;
        assert_eq!(
            (reply.http_status, reply.grpc_status),
            (431, None),
            "headers over 8 KiB: {reply:?}"
        );
        // What a tonic client reports for it.
        assert_status(
            raw_call(&channel, GET_TOKEN, Vec::new(), &[("x-padding", padding)]).await,
            Code::Unknown,
            "grpc-status header missing, mapped from HTTP status code 431",
            "a tonic call with 9 KiB of metadata",
        );
        // 7 KiB is within the limit, on the same connection.
        let response = raw_call(
            &channel,
            GET_TOKEN,
            Vec::new(),
            &[("x-padding", "a".repeat(7 * 1024))],
        )
        .await
        .expect("a call with 7 KiB of metadata");
        let response: GetTokenResponse =
            prost::Message::decode(response.as_slice()).expect("a GetTokenResponse");
        check_response(&response, shared_key(), "default", 3600);
    });
    assert_still_serves(&agent, pid, shared_key());
}

#[test]
fn garbage_bytes_on_the_socket_close_that_connection_only() {
    let dir = Dir::new();
    let agent = dir.serve(&shared_key().write(&dir, "private.pem"));
    let pid = agent_pid(agent.socket());
    let mut grpc = agent.grpc();
    let before = grpc.ok(request("", None, None));
    // A TLS ClientHello's first bytes, then text.
    let received = send_raw_until_closed(
        agent.socket(),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not HTTP/2 at all \xff\xfe",
    );
    assert_eq!(
        frame_types(&received),
        [SETTINGS],
        "the agent sends only its SETTINGS before closing: {received:?}"
    );
    // A connection made before the garbage is unaffected.
    eqnice(
        &before.token,
        &grpc.ok(request("", None, None)).token,
        "token on the earlier connection",
    );
    assert_still_serves(&agent, pid, shared_key());
}

#[test]
fn http1_request_on_the_socket_gets_no_http1_answer_and_is_closed() {
    let dir = Dir::new();
    let agent = dir.serve(&shared_key().write(&dir, "private.pem"));
    let pid = agent_pid(agent.socket());
    let received = send_raw_until_closed(
        agent.socket(),
        b"POST /skykit.agent.v1.TokenService/GetToken HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/grpc\r\nContent-Length: 0\r\n\r\n",
    );
    assert!(
        !received.starts_with(b"HTTP/1"),
        "the agent answered HTTP/1: {}",
        String::from_utf8_lossy(&received)
    );
    assert_eq!(frame_types(&received), [SETTINGS], "{received:?}");
    assert_still_serves(&agent, pid, shared_key());
}

#[test]
fn half_a_preface_or_silence_is_closed_at_the_handshake_timeout() {
    let dir = Dir::new();
    let agent = serve_with_limits(&dir, "handshake_timeout = \"1s\"\n");
    let pid = agent_pid(agent.socket());
    // Half a preface, then nothing; and a client that sends nothing at all.
    for bytes in [&PREFACE[..12], &[][..]] {
        let received = send_raw_until_closed(agent.socket(), bytes);
        assert_eq!(frame_types(&received), [SETTINGS], "{received:?}");
    }
    let closed = agent
        .stderr()
        .matches("closing a connection that did not complete the HTTP/2 handshake in time")
        .count();
    assert_eq!(closed, 2, "{}", agent.stderr());
    assert_still_serves(&agent, pid, shared_key());
}

#[test]
fn signatures_forced_beyond_the_per_uid_budget_are_resource_exhausted() {
    let dir = Dir::new();
    let agent = serve_with_limits(&dir, "new_signatures_per_uid_per_minute = 3\n");
    let pid = agent_pid(agent.socket());
    let mut grpc = agent.grpc();
    // Three new lifetimes: three signatures, the whole budget.
    let signed: Vec<GetTokenResponse> = [600, 601, 602]
        .map(|lifetime| grpc.ok(request("", Some(lifetime), None)))
        .into();
    let uid = rustix::process::geteuid().as_raw();
    let refused = format!(
        "uid {uid} has forced too many new signatures: reuse tokens (a fixed lifetime, no min_valid_for) or retry later (the limit is 3 per minute)"
    );
    assert_status(
        grpc.get_token(request("", Some(603), None)),
        Code::ResourceExhausted,
        &refused,
        "a fourth new lifetime",
    );
    assert_status(
        grpc.get_token(request("", Some(600), Some(600))),
        Code::ResourceExhausted,
        &refused,
        "min_valid_for that forces a signature",
    );
    // Cached tokens are still served without a signature.
    for (lifetime, first) in [600, 601, 602].iter().zip(&signed) {
        let again = grpc.ok(request("", Some(*lifetime), None));
        eqnice(&first.token, &again.token, "cached token");
        check_response(&again, shared_key(), "default", *lifetime as u64);
    }
    assert_eq!(agent_pid(agent.socket()), pid);
}

// ---------------------------------------------------------------------------
// 2. Config: each error at startup (exit 78, nothing bound) and on SIGHUP
//    (the old config keeps serving).
// ---------------------------------------------------------------------------

/// The config of the running agent in the SIGHUP tests.
fn good_config() -> String {
    format!("[[identity]]\nissuer = \"{ISSUER}\"\nkey = \"private.pem\"\n")
}

/// One bad config: a label, the file, and what the error must contain
/// (`{file}` stands for the config's path).
struct BadConfig {
    what: &'static str,
    toml: String,
    expected: Vec<String>,
}

fn bad_configs(dir: &Dir) -> Vec<BadConfig> {
    let identity = |extra: &str| {
        format!("[[identity]]\nissuer = \"{ISSUER}\"\nkey = \"private.pem\"\n{extra}")
    };
    let named = |name: &str, extra: &str| {
        format!(
            "[[identity]]\nname = \"{name}\"\nissuer = \"{ISSUER}\"\nkey = \"private.pem\"\n{extra}"
        )
    };
    let case = |what, toml: String, expected: &[&str]| BadConfig {
        what,
        toml,
        expected: expected.iter().map(|part| (*part).to_owned()).collect(),
    };
    let absent = dir.join("absent.pem");
    vec![
        case(
            "unknown top-level key",
            format!("colour = \"blue\"\n{}", identity("")),
            &["{file}:1: unknown key `colour`; expected one of: socket, socket_mode"],
        ),
        case(
            "unknown key in [[identity]]",
            identity("colour = \"blue\"\n"),
            &["{file}:4: unknown key `colour` in [[identity]]"],
        ),
        case(
            "unknown key in [limits]",
            format!("[limits]\nmax_bananas = 3\n{}", identity("")),
            &["{file}:2: unknown key `max_bananas` in [limits]"],
        ),
        case(
            "wrong type: lifetime as a number",
            identity("lifetime = 600\n"),
            &["{file}:4: `lifetime` must be a string"],
        ),
        case(
            "wrong type: default as a string",
            identity("default = \"yes\"\n"),
            &["{file}:4: `default` must be true or false"],
        ),
        case(
            "wrong type: a [limits] count as a string",
            format!("[limits]\nmax_message_bytes = \"big\"\n{}", identity("")),
            &[
                "{file}:2: `max_message_bytes` must be a positive whole number (at most 4294967295), not \"big\"",
            ],
        ),
        case(
            "bad duration",
            identity("lifetime = \"ten minutes\"\n"),
            &["{file}:4: `lifetime`", "\"ten minutes\"", "90s, 10m or 1h"],
        ),
        case(
            "lifetime over an hour",
            identity("lifetime = \"2h\"\n"),
            &["{file}:4: `lifetime`: lifetime 7200s is over the maximum of 3600s"],
        ),
        case(
            "a [limits] duration under 1s",
            format!("[limits]\nrequest_timeout = \"0s\"\n{}", identity("")),
            &["{file}:2: `request_timeout` must be at least 1s"],
        ),
        case(
            "bad socket mode",
            format!("socket_mode = \"0999\"\n{}", identity("")),
            &["{file}:1: socket_mode \"0999\" is not a file mode"],
        ),
        case(
            "unknown socket group",
            format!("socket_group = \"no-such-group-xyz\"\n{}", identity("")),
            &[
                "{file}:1:",
                "no-such-group-xyz",
                "not a group on this system",
            ],
        ),
        case(
            "duplicate identity",
            format!("{}{}", named("a", "default = true\n"), named("a", "")),
            &["{file}:6: ", "\"a\" is already used at line 1"],
        ),
        case(
            "two defaults",
            format!(
                "{}{}",
                named("a", "default = true\n"),
                named("b", "default = true\n")
            ),
            &["several identities say default = true", "line 1", "line 6"],
        ),
        case(
            "no default among several",
            format!("{}{}", named("a", ""), named("b", "")),
            &["2 identities and none says default = true"],
        ),
        case(
            "missing issuer",
            "[[identity]]\nkey = \"private.pem\"\n".to_owned(),
            &["{file}:1: ", "has no `issuer`"],
        ),
        case(
            "issuer that is not an email",
            "[[identity]]\nissuer = \"not-an-email\"\nkey = \"private.pem\"\n".to_owned(),
            &["{file}:1: issuer \"not-an-email\" is not an email address"],
        ),
        case(
            "bad identity name",
            named("Bad Name", ""),
            &["{file}:1: identity name \"Bad Name\" is not allowed: use 1 to 64 of a-z"],
        ),
        case(
            "missing key file",
            format!("[[identity]]\nissuer = \"{ISSUER}\"\nkey = \"absent.pem\"\n"),
            &[&format!("signing key {} does not exist", absent.display())],
        ),
        case(
            "unknown user in allow_users",
            identity("allow_users = [\"no-such-user-xyz\"]\n"),
            &["{file}:4: ", "\"no-such-user-xyz\" is not a user"],
        ),
        case(
            "unknown group in allow_groups",
            identity("allow_groups = [\"no-such-group-xyz\"]\n"),
            &["{file}:4: ", "\"no-such-group-xyz\" is not a group"],
        ),
        case(
            "a policy that admits nobody",
            identity("allow_uids = []\n"),
            &["{file}:1: ", "admits nobody"],
        ),
        case(
            "[identity] instead of [[identity]]",
            format!("[identity]\nissuer = \"{ISSUER}\"\n"),
            &["{file}:1: ", "write [[identity]], not [identity]"],
        ),
        case("TOML syntax error", identity("name = \n"), &["{file}:4: "]),
    ]
}

/// The expected parts of `case` with `{file}` replaced by `config`.
fn expected_parts(case: &BadConfig, config: &Path) -> Vec<String> {
    case.expected
        .iter()
        .map(|part| part.replace("{file}", &config.display().to_string()))
        .collect()
}

#[test]
fn each_config_error_at_startup_exits_78_and_binds_nothing() {
    let dir = Dir::new();
    shared_key().write(&dir, "private.pem");
    let mut failures = Vec::new();
    for case in bad_configs(&dir) {
        let config = dir.write("config.toml", &case.toml);
        let output = dir.run(&[
            "serve",
            "--config",
            text(&config),
            "--socket",
            text(&dir.socket()),
        ]);
        let expected = expected_parts(&case, &config);
        let needles: Vec<&str> = std::iter::once("invalid configuration")
            .filter(|_| !case.what.starts_with("missing key"))
            .chain(expected.iter().map(String::as_str))
            .collect();
        let stderr = String::from_utf8_lossy(&output.stderr);
        if output.status.code() != Some(EXIT_CONFIG)
            || needles.iter().any(|needle| !stderr.contains(needle))
        {
            failures.push(format!(
                "{}: expected exit 78 with {needles:?}\n--- config ---\n{}--- got {} ---\n{stderr}",
                case.what, case.toml, output.status,
            ));
        }
        if fs::symlink_metadata(dir.socket()).is_ok() {
            failures.push(format!("{}: serve bound its socket", case.what));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The finish time of the agent's last reload, if any.
fn last_reload(socket: &Path, runtime: &tokio::runtime::Runtime) -> Option<(i64, i32)> {
    let report = runtime.block_on(status(socket));
    report
        .last_reload
        .and_then(|reload| reload.finished_at)
        .map(|time| (time.seconds, time.nanos))
}

/// Sends SIGHUP and waits until the agent records a reload after
/// `previous`; returns the new reload's finish time.
fn reload(
    agent: &Agent<'_>,
    runtime: &tokio::runtime::Runtime,
    previous: Option<(i64, i32)>,
) -> Option<(i64, i32)> {
    agent.signal(Signal::HUP);
    let mut finished = previous;
    wait_until("a reload is recorded after SIGHUP", || {
        finished = last_reload(agent.socket(), runtime);
        finished != previous
    });
    finished
}

/// Asserts that `skykit-agent status` exits 5 and shows the failed
/// reload with every part of `expected`.
fn assert_failed_reload_shown(dir: &Dir, socket: &Path, what: &str, expected: &[String]) {
    let output = dir.run(&["status", "--socket", text(socket)]);
    let report = String::from_utf8_lossy(&output.stdout);
    let reload = report
        .lines()
        .skip_while(|line| !line.starts_with("last reload: "))
        .take_while(|line| !line.starts_with("open connections: "))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        output.status.code() == Some(5)
            && reload.contains(" FAILED: ")
            && expected.iter().all(|part| reload.contains(part.as_str())),
        "{what}: status does not show the failed reload with {expected:?} (exit {})\n{report}",
        output.status
    );
    assert!(
        report.lines().any(|line| line == "serving: yes"),
        "{report}"
    );
}

/// Starts the agent of the SIGHUP tests: `config.toml` naming
/// `private.pem` with the shared key, the socket given by flag.
fn start_reloadable(dir: &Dir) -> (Agent<'_>, PathBuf) {
    shared_key().write(dir, "private.pem");
    let config = dir.write("config.toml", good_config());
    let agent = dir.start(dir.command(&[
        "serve",
        "--config",
        text(&config),
        "--socket",
        text(&dir.socket()),
    ]));
    (agent, config)
}

/// A newly signed token (a lifetime not asked for before) must still
/// come from the old key.
fn assert_old_key_signs(grpc: &mut Grpc, lifetime: i64, what: &str) {
    let response = grpc
        .get_token(request("", Some(lifetime), None))
        .unwrap_or_else(|status| panic!("{what}: GetToken failed after the reload: {status:?}"));
    check_response(&response, shared_key(), "default", lifetime as u64);
}

#[test]
fn each_config_error_on_sighup_keeps_the_old_config_serving() {
    let dir = Dir::new();
    let (agent, config) = start_reloadable(&dir);
    let pid = agent_pid(agent.socket());
    let runtime = runtime();
    let mut grpc = agent.grpc();
    let mut previous = None;
    let mut failures = Vec::new();
    for (round, case) in bad_configs(&dir).into_iter().enumerate() {
        dir.write("config.toml", &case.toml);
        previous = reload(&agent, &runtime, previous);
        let expected = expected_parts(&case, &config);
        let report = runtime.block_on(status(agent.socket()));
        let reload = report.last_reload.expect("a reload was recorded");
        if reload.ok
            || !expected
                .iter()
                .all(|part| reload.error.contains(part.as_str()))
        {
            failures.push(format!(
                "{}: the reload should fail with {expected:?}, got {reload:?}",
                case.what
            ));
            continue;
        }
        assert_failed_reload_shown(&dir, agent.socket(), case.what, &expected);
        assert_old_key_signs(&mut grpc, 600 + round as i64, case.what);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The good config reloads again.
    dir.write("config.toml", good_config());
    reload(&agent, &runtime, previous);
    let report = runtime.block_on(status(agent.socket()));
    assert!(report.last_reload.expect("a reload").ok);
    assert_still_serves(&agent, pid, shared_key());
}

// ---------------------------------------------------------------------------
// 3. Keys: refused keys on SIGHUP (startup: keys.rs).
// ---------------------------------------------------------------------------

#[test]
fn each_refused_key_on_sighup_keeps_the_old_key_serving() {
    let dir = Dir::new();
    let (agent, _config) = start_reloadable(&dir);
    let pid = agent_pid(agent.socket());
    let path = dir.join("private.pem");
    let runtime = runtime();
    let mut grpc = agent.grpc();
    let pem = &shared_key().private_pem;
    let text_fixture = |name: &str| String::from_utf8(fixture(name)).expect("a text fixture");
    // (what, contents or None to delete the file, mode, expected reason)
    let cases: Vec<(&str, Option<String>, u32, &str)> = vec![
        ("missing", None, 0o600, "does not exist"),
        (
            "public key",
            Some(text_fixture("rsa2048-public.pem")),
            0o600,
            "holds a public key (`BEGIN PUBLIC KEY`), not a private key",
        ),
        (
            "encrypted",
            Some(text_fixture("encrypted-pkcs8.pem")),
            0o600,
            "is encrypted with a passphrase",
        ),
        (
            "EC",
            Some(text_fixture("ec-pkcs8.pem")),
            0o600,
            "is an EC (elliptic curve) private key, but Skykit API needs an RSA key",
        ),
        (
            "too short",
            Some(text_fixture("rsa1024.pem")),
            0o600,
            "is a 1024-bit RSA key; the agent accepts 2048 to 8192 bits",
        ),
        (
            "loose permissions",
            Some(pem.clone()),
            0o644,
            "has mode 0644, so other users may read it",
        ),
        (
            "truncated",
            Some(pem[..pem.len() / 2].to_owned()),
            0o600,
            "the file looks truncated",
        ),
        (
            "two keys",
            Some(format!("{pem}{}", pkcs1_key().private_pem)),
            0o600,
            "holds 2 private keys",
        ),
        ("empty", Some(String::new()), 0o600, "is empty"),
        (
            "not PEM",
            Some("my key is in the password manager\n".to_owned()),
            0o600,
            "is not PEM",
        ),
    ];
    let mut previous = None;
    for (round, (what, contents, mode, reason)) in cases.into_iter().enumerate() {
        match contents {
            Some(contents) => {
                dir.write_mode("private.pem", contents, mode);
            }
            None => fs::remove_file(&path).expect("remove the key"),
        }
        previous = reload(&agent, &runtime, previous);
        let expected = [format!("signing key {}", path.display()), reason.to_owned()];
        let report = runtime.block_on(status(agent.socket()));
        let reload = report.last_reload.expect("a reload was recorded");
        assert!(
            !reload.ok
                && expected
                    .iter()
                    .all(|part| reload.error.contains(part.as_str())),
            "{what}: the reload should fail with {expected:?}, got {reload:?}"
        );
        assert_failed_reload_shown(&dir, agent.socket(), what, &expected);
        assert_old_key_signs(&mut grpc, 600 + round as i64, what);
    }
    shared_key().write(&dir, "private.pem");
    reload(&agent, &runtime, previous);
    assert!(
        runtime
            .block_on(status(agent.socket()))
            .last_reload
            .expect("a reload")
            .ok
    );
    assert_still_serves(&agent, pid, shared_key());
}

// ---------------------------------------------------------------------------
// 4. Environment: socket paths the agent cannot use.
// ---------------------------------------------------------------------------

/// `serve` on `socket` must exit 1 with `message` and leave nothing there.
fn check_cannot_listen(dir: &Dir, socket: &Path, message: &str) {
    let key = shared_key().write(dir, "private.pem");
    let mut command = dir.command(&["serve", "--socket"]);
    command
        .arg(socket)
        .arg("--key")
        .arg(&key)
        .args(["--issuer", ISSUER]);
    assert_exit(&run(command), 1, &[message]);
}

#[test]
fn socket_path_over_107_bytes_exits_1_naming_the_limit() {
    let dir = Dir::new();
    let base = dir.path().as_os_str().len() + 1;
    let long = dir.join(&"s".repeat(108 - base));
    assert_eq!(long.as_os_str().len(), 108);
    check_cannot_listen(
        &dir,
        &long,
        &format!(
            "socket path {} is 108 bytes, over the kernel's limit of 107: choose a shorter --socket",
            long.display()
        ),
    );
    assert!(fs::symlink_metadata(&long).is_err(), "a file was created");
    // 107 bytes is the longest path that works.
    let longest = dir.join(&"s".repeat(107 - base));
    let key = shared_key().write(&dir, "private.pem");
    let mut command = dir.command(&["serve", "--socket"]);
    command
        .arg(&longest)
        .arg("--key")
        .arg(&key)
        .args(["--issuer", ISSUER]);
    let agent = dir.start_at(command, &longest);
    check_response(
        &agent.grpc().ok(request("", None, None)),
        shared_key(),
        "default",
        3600,
    );
}

#[test]
fn directory_at_the_socket_path_is_refused_and_kept() {
    let dir = Dir::new();
    fs::create_dir(dir.socket()).expect("create a directory at the socket path");
    check_cannot_listen(
        &dir,
        &dir.socket(),
        &format!(
            "{} exists and is a directory, not a socket; the agent never removes it",
            dir.socket().display()
        ),
    );
    assert!(dir.socket().is_dir());
}

#[test]
fn socket_parent_that_is_a_regular_file_exits_1() {
    let dir = Dir::new();
    dir.write("run", "not a directory\n");
    let socket = dir.join("run/agent.sock");
    check_cannot_listen(
        &dir,
        &socket,
        &format!(
            "cannot listen on {}: Not a directory (os error 20)",
            socket.display()
        ),
    );
    assert_eq!(
        fs::read_to_string(dir.join("run")).unwrap(),
        "not a directory\n"
    );
}

#[test]
fn socket_directory_the_agent_cannot_write_exits_1() {
    require_root("run the agent as uid 65534 with setpriv");
    require_tool("setpriv", "apt-get install util-linux");
    let dir = Dir::new();
    chmod(dir.path(), 0o755);
    // The binary where uid 65534 can run it, and a key it may read.
    let binary = dir.join("skykit-agent");
    if fs::hard_link(BIN, &binary).is_err() {
        fs::copy(BIN, &binary).expect("copy the binary where nobody can run it");
    }
    let key = shared_key().write(&dir, "private.pem");
    std::os::unix::fs::chown(&key, Some(NOBODY), Some(NOBODY)).expect("chown the key");
    // root's 0755 directory: uid 65534 may enter it but not create in it.
    let run_dir = dir.join("run");
    fs::create_dir(&run_dir).expect("create the socket directory");
    chmod(&run_dir, 0o755);
    assert_eq!(fs::metadata(&run_dir).unwrap().uid(), 0);
    let socket = run_dir.join("agent.sock");
    let mut command = Command::new("setpriv");
    scrub(&mut command, dir.path());
    command
        .args([
            format!("--reuid={NOBODY}"),
            format!("--regid={NOBODY}"),
            "--clear-groups".to_owned(),
        ])
        .arg(&binary)
        .args(["serve", "--socket"])
        .arg(&socket)
        .arg("--key")
        .arg(&key)
        .args(["--issuer", ISSUER]);
    assert_exit(
        &run(command),
        1,
        &[&format!(
            "cannot listen on {}: Permission denied (os error 13)",
            socket.display()
        )],
    );
    assert!(fs::symlink_metadata(&socket).is_err());
}
