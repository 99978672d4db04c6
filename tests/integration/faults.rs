//! The fault rows of `docs/RELIABILITY.md` that no other module proves:
//! crashes, signals with calls in flight, clients that abandon, stall or
//! flood the agent, descriptor exhaustion, files changed under a running
//! agent, and the wall clock stepping.
//!
//! Every case ends by showing that the agent (or, after a crash or a stop,
//! its replacement) serves a token that verifies. Durations are only
//! checked against generous polling deadlines.

use std::{
    fs,
    io::Write,
    os::unix::{fs::MetadataExt, net::UnixStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rustix::process::Signal;
use skykit_agent::proto::{GetTokenResponse, token_service_client::TokenServiceClient};
use tokio::sync::oneshot;
use tonic::{Code, transport::Channel};

use crate::{bad_input::*, support::*};

/// A client-side bound on one call, so a call the agent cannot answer
/// fails instead of hanging the test.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// One GetToken on a new connection, bounded by `timeout`.
async fn get_token_once(socket: &Path, timeout: Duration) -> Result<GetTokenResponse, String> {
    let call = async {
        let channel = skykit_agent::client::channel(socket)
            .await
            .map_err(|error| format!("connect: {error}"))?;
        TokenServiceClient::new(channel)
            .get_token(request("", None, None))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| format!("{status:?}"))
    };
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

/// Polls GetToken on new connections until one succeeds within `deadline`.
fn wait_for_token(socket: &Path, deadline: Duration) -> GetTokenResponse {
    let runtime = runtime();
    let until = Instant::now() + deadline;
    loop {
        let attempt = runtime.block_on(get_token_once(socket, Duration::from_secs(1)));
        match attempt {
            Ok(response) => return response,
            Err(error) => assert!(
                Instant::now() < until,
                "no token within {deadline:?}; last error: {error}"
            ),
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The agent's open connections and calls in progress, as GetStatus
/// reports them on its own connection (which counts itself and its call).
fn connections_and_calls(socket: &Path, runtime: &tokio::runtime::Runtime) -> (u32, u32) {
    let report = runtime.block_on(status(socket));
    (report.open_connections, report.calls_in_progress)
}

/// Polls GetStatus until it reports `expected`, failing with the last
/// report after [`DEADLINE`].
fn wait_for_counts(socket: &Path, runtime: &tokio::runtime::Runtime, expected: (u32, u32)) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let counts = connections_and_calls(socket, runtime);
        if counts == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "(open connections, calls in progress) is {counts:?}, not {expected:?}, after {DEADLINE:?}"
        );
        thread::sleep(POLL);
    }
}

/// A raw connection the test holds open: it sends `bytes` and never reads.
fn stalled_connection(socket: &Path, bytes: &[u8]) -> UnixStream {
    let mut stream = UnixStream::connect(socket).expect("connect to the agent");
    stream.write_all(bytes).expect("send the bytes");
    stream
}

/// Whether the agent has closed `stream`, seen without reading from it.
fn hung_up(stream: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd for a descriptor `stream` keeps open; a
    // zero timeout only reports the current state.
    let ready = unsafe { libc::poll(&mut fd, 1, 0) };
    assert!(ready >= 0, "poll: {}", std::io::Error::last_os_error());
    fd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// A HEADERS frame (END_HEADERS, not END_STREAM) opening a GetToken call
/// on `stream`, its header block hand-encoded with HPACK literals.
fn get_token_headers(stream: u32) -> Vec<u8> {
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
    block.push(0x04); // :path, literal
    block.push(GET_TOKEN.len() as u8);
    block.extend_from_slice(GET_TOKEN.as_bytes());
    block.extend_from_slice(&[0x01, 9]); // :authority, literal
    block.extend_from_slice(b"localhost");
    block.extend_from_slice(&[0x0f, 0x10, 16]); // content-type, literal
    block.extend_from_slice(b"application/grpc");
    block.extend_from_slice(&[0x00, 2]); // te: trailers, new name
    block.extend_from_slice(b"te");
    block.push(8);
    block.extend_from_slice(b"trailers");
    let mut frame = vec![0, 0, block.len() as u8, 0x1, 0x4];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend(block);
    frame
}

/// A whole GetToken call on `stream`: HEADERS, then an empty message in a
/// DATA frame that ends the stream.
fn get_token_call(stream: u32) -> Vec<u8> {
    let mut frames = get_token_headers(stream);
    frames.extend_from_slice(&[0, 0, 5, 0x0, 0x1]);
    frames.extend_from_slice(&stream.to_be_bytes());
    frames.extend_from_slice(&[0, 0, 0, 0, 0]);
    frames
}

/// The error code and debug text of the first GOAWAY frame in `bytes`.
fn goaway(bytes: &[u8]) -> Option<(u32, String)> {
    let mut rest = bytes;
    while rest.len() >= 9 {
        let length = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        let payload = &rest[9..(9 + length).min(rest.len())];
        if rest[3] == 7 && payload.len() >= 8 {
            let code = u32::from_be_bytes(payload[4..8].try_into().expect("4 bytes"));
            return Some((code, String::from_utf8_lossy(&payload[8..]).into_owned()));
        }
        rest = &rest[(9 + length).min(rest.len())..];
    }
    None
}

/// HTTP/2's ENHANCE_YOUR_CALM error code.
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// Sum of user and system CPU time of `pid` in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name, which is in parentheses: utime and
    // stime are fields 14 and 15 of the line, 12 and 13 after `) `.
    let after = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let field = |index: usize| -> u64 { fields[index].parse().expect("a tick count") };
    field(11) + field(12)
}

/// The number of open file descriptors of `pid`.
fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list /proc/PID/fd")
        .count()
}

/// A config with `[limits]` `settings` and the per-uid budget raised, for
/// tests that force many signatures on purpose.
fn serve_unthrottled<'d>(dir: &'d Dir, settings: &str) -> Agent<'d> {
    serve_with_limits(
        dir,
        &format!("new_signatures_per_uid_per_minute = 1000000\n{settings}"),
    )
}

// ---------------------------------------------------------------------------
// 1. Crash and stop.
// ---------------------------------------------------------------------------

#[test]
fn kill_9_under_load_then_restart_replaces_the_stale_socket_and_old_tokens_verify() {
    let dir = Dir::new();
    let mut agent = serve_unthrottled(&dir, "");
    let socket = agent.socket().to_owned();
    let runtime = runtime();
    let stop = Arc::new(AtomicBool::new(false));
    let issued: Arc<Mutex<Vec<(u64, GetTokenResponse)>>> = Arc::default();
    // 16 callers, each on its own connection; every third call forces a
    // signature.
    let callers: Vec<_> = (0..16u64)
        .map(|caller| {
            let (stop, issued, socket) = (stop.clone(), issued.clone(), socket.clone());
            runtime.spawn(async move {
                let mut client = TokenServiceClient::new(channel(&socket).await);
                for call in 0u64.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let lifetime = 60 + (caller * 7 + call) % 40;
                    let forced = (call % 3 == 0).then_some(lifetime as i64);
                    match client
                        .get_token(request("", Some(lifetime as i64), forced))
                        .await
                    {
                        Ok(response) => issued
                            .lock()
                            .unwrap()
                            .push((lifetime, response.into_inner())),
                        // The agent is gone.
                        Err(_) => break,
                    }
                }
            })
        })
        .collect();
    wait_until("1000 calls answered under load", || {
        issued.lock().unwrap().len() >= 1000
    });
    agent.signal(Signal::KILL);
    let killed = agent.wait();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&killed),
        Some(9),
        "{killed}"
    );
    stop.store(true, Ordering::SeqCst);
    for caller in callers {
        runtime.block_on(caller).expect("a calling task");
    }
    // SIGKILL ran no destructor: the socket file is left behind, stale.
    assert!(
        fs::symlink_metadata(&socket).is_ok(),
        "the killed agent's socket file is gone"
    );
    assert!(
        UnixStream::connect(&socket).is_err(),
        "something still listens on the socket"
    );

    let restarted = dir.start(dir.serve_command(&dir.join("private.pem"), &[]));
    assert!(
        restarted.stderr().contains("replacing a stale socket"),
        "{}",
        restarted.stderr()
    );
    let issued = issued.lock().unwrap();
    for (lifetime, response) in issued.iter() {
        check_response(response, shared_key(), "default", *lifetime);
    }
    let pid = agent_pid(restarted.socket());
    assert_still_serves(&restarted, pid, shared_key());
}

#[test]
fn sigterm_finishes_calls_in_flight_and_exits_0_at_the_drain_deadline() {
    let dir = Dir::new();
    // Only the 2 s drain deadline, not these 60 s timeouts, can end the
    // stuck call and the stuck connection.
    let mut agent = serve_with_limits(
        &dir,
        "drain_timeout = \"2s\"\nrequest_timeout = \"60s\"\nhandshake_timeout = \"60s\"\n",
    );
    let socket = agent.socket().to_owned();
    let runtime = runtime();
    let connection = runtime.block_on(channel(&socket));
    let (mut releases, mut calls) = start_deferred(&runtime, &connection, 2);
    let (stuck, in_flight) = (calls.remove(1), calls.remove(0));
    let release = releases.remove(0);
    // Once a later call on the connection is answered, the agent has both
    // deferred calls' HEADERS: they are in flight.
    let answered = runtime
        .block_on(TokenServiceClient::new(connection.clone()).get_token(request("", None, None)))
        .expect("a call behind the deferred ones");
    check_response(&answered.into_inner(), shared_key(), "default", 3600);
    let _stuck_connection = stalled_connection(&socket, &PREFACE[..10]);

    agent.signal(Signal::TERM);
    let signalled = Instant::now();
    wait_for_log(&agent, "stopped accepting; draining calls in flight");
    release.send(()).expect("the in-flight call waits");
    let finished = runtime
        .block_on(in_flight)
        .expect("the in-flight task")
        .expect("the call in flight at SIGTERM finishes");
    check_response(&finished, shared_key(), "default", 3600);

    let exit = agent.wait();
    let took = signalled.elapsed();
    assert_eq!(exit.code(), Some(0), "{}", agent.stderr());
    assert!(
        took < Duration::from_secs(2 + 10),
        "the agent took {took:?} to exit after SIGTERM with a 2 s drain deadline"
    );
    let log = agent.stderr();
    assert!(
        log.contains("drain deadline passed; closing the connections still open"),
        "{log}"
    );
    assert!(
        runtime.block_on(stuck).expect("the stuck task").is_err(),
        "the call whose message never came cannot succeed"
    );
    assert!(fs::symlink_metadata(&socket).is_err(), "the socket is left");

    let restarted = dir.start(dir.serve_command(&dir.join("private.pem"), &[]));
    let pid = agent_pid(restarted.socket());
    assert_still_serves(&restarted, pid, shared_key());
}

// ---------------------------------------------------------------------------
// 2. Clients that abandon, stall or flood.
// ---------------------------------------------------------------------------

#[test]
fn calls_and_connections_dropped_mid_call_leave_no_connection_or_call_behind() {
    let dir = Dir::new();
    let agent = serve_unthrottled(&dir, "handshake_timeout = \"60s\"\n");
    let pid = agent_pid(agent.socket());
    let socket = agent.socket().to_owned();
    let runtime = runtime();
    // At rest, GetStatus sees its own connection and its own call.
    let start = (1, 1);
    wait_for_counts(&socket, &runtime, start);

    // Raw connections, held open: half a preface, or a whole preface then
    // a frame header cut short. Then four client connections.
    let raw: Vec<UnixStream> = (0..8)
        .map(|index| {
            let bytes: &[u8] = if index % 2 == 0 {
                &PREFACE[..7]
            } else {
                &[PREFACE, &[0, 0, 9, 1]].concat()
            };
            stalled_connection(&socket, bytes)
        })
        .collect();
    let channels: Vec<Channel> = (0..4).map(|_| runtime.block_on(channel(&socket))).collect();
    wait_for_counts(&socket, &runtime, (start.0 + 8 + 4, start.1));
    let (mut deferred, mut abandoned, mut releases) = (Vec::new(), Vec::new(), Vec::new());
    for connection in &channels {
        // Calls whose message never comes: reset when their task is aborted.
        let (held, calls) = start_deferred(&runtime, connection, 4);
        releases.extend(held);
        deferred.extend(calls);
        // Calls that sign, abandoned at every stage of the call. Resetting
        // this many streams at once may also make the agent's HTTP/2 layer
        // close the connection (its rapid-reset protection); either way
        // nothing may be left behind.
        for call in 0..25u64 {
            let mut client = TokenServiceClient::new(connection.clone());
            let patience = Duration::from_micros(call * 200);
            abandoned.push(runtime.spawn(async move {
                let lifetime = 60 + call as i64;
                let _ = tokio::time::timeout(
                    patience,
                    client.get_token(request("", Some(lifetime), Some(lifetime))),
                )
                .await;
            }));
        }
    }
    for task in abandoned {
        runtime.block_on(task).expect("an abandoning task");
    }
    for task in &deferred {
        task.abort();
    }
    for task in deferred {
        let _ = runtime.block_on(task);
    }
    drop(releases);
    drop(channels);
    drop(raw);
    wait_for_counts(&socket, &runtime, start);
    assert_still_serves(&agent, pid, shared_key());
    wait_for_counts(&socket, &runtime, start);
}

#[test]
fn a_rapid_reset_flood_gets_goaway_enhance_your_calm_and_others_are_served() {
    let dir = Dir::new();
    let agent = dir.serve(&shared_key().write(&dir, "private.pem"));
    let pid = agent_pid(agent.socket());
    let runtime = runtime();
    let mut client = TokenServiceClient::new(runtime.block_on(channel(agent.socket())));
    // CVE-2023-44487: open 100 calls and reset each at once (CANCEL).
    let mut flood = [PREFACE, EMPTY_SETTINGS].concat();
    for index in 0..100u32 {
        let stream = 1 + 2 * index;
        flood.extend(get_token_headers(stream));
        flood.extend_from_slice(&[0, 0, 4, 0x3, 0]);
        flood.extend_from_slice(&stream.to_be_bytes());
        flood.extend_from_slice(&8u32.to_be_bytes());
    }
    let received = send_raw_until_closed(agent.socket(), &flood);
    assert_eq!(
        goaway(&received),
        Some((ENHANCE_YOUR_CALM, "too_many_resets".to_owned())),
        "{received:?}"
    );
    // The same frames without the resets are answered: the flood was
    // refused for its resets, not its encoding.
    let mut calls = [PREFACE, EMPTY_SETTINGS].concat();
    calls.extend(get_token_call(1));
    let mut stream = stalled_connection(agent.socket(), &calls);
    let mut answer = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    stream
        .set_read_timeout(Some(DEADLINE))
        .expect("set a read timeout");
    // The response message holds the token, whose header is fixed.
    let token_header = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.";
    while !String::from_utf8_lossy(&answer).contains(token_header) {
        let length = std::io::Read::read(&mut stream, &mut buffer).expect("read the answer");
        assert!(length > 0, "closed before answering: {answer:?}");
        answer.extend_from_slice(&buffer[..length]);
    }
    drop(stream);
    let response = runtime
        .block_on(client.get_token(request("", None, None)))
        .expect("another connection is served");
    check_response(&response.into_inner(), shared_key(), "default", 3600);
    wait_for_counts(agent.socket(), &runtime, (2, 1));
    assert_still_serves(&agent, pid, shared_key());
}

#[test]
fn stalled_clients_are_closed_by_keepalive_while_others_are_served() {
    let dir = Dir::new();
    // The handshake deadline cannot be what closes them: both send the
    // whole preface, and it is 60 s anyway.
    let agent = serve_with_limits(
        &dir,
        "keepalive_interval = \"1s\"\nkeepalive_timeout = \"1s\"\nhandshake_timeout = \"60s\"\n",
    );
    let pid = agent_pid(agent.socket());
    let socket = agent.socket().to_owned();
    let runtime = runtime();
    // A client that sends 100 calls and never reads their answers (nor
    // the pings), and one that sends half a frame header.
    let mut calls = [PREFACE, EMPTY_SETTINGS].concat();
    for index in 0..100u32 {
        calls.extend(get_token_call(1 + 2 * index));
    }
    let never_reads = stalled_connection(&socket, &calls);
    let half_frame = stalled_connection(&socket, &[PREFACE, &EMPTY_SETTINGS[..5]].concat());

    let mut client = TokenServiceClient::new(runtime.block_on(channel(&socket)));
    let mut served = 0;
    let deadline = Instant::now() + DEADLINE;
    while !(hung_up(&never_reads) && hung_up(&half_frame)) {
        assert!(
            Instant::now() < deadline,
            "the stalled connections are still open after {DEADLINE:?}"
        );
        let response = runtime
            .block_on(client.get_token(request("", None, None)))
            .expect("another client is served meanwhile");
        check_response(&response.into_inner(), shared_key(), "default", 3600);
        served += 1;
        thread::sleep(Duration::from_millis(50));
    }
    assert!(served > 0);
    // Only the test's own client and the status connection remain.
    wait_for_counts(&socket, &runtime, (2, 1));
    let response = runtime
        .block_on(client.get_token(request("", None, None)))
        .expect("the well-behaved client answered pings and still has its connection");
    check_response(&response.into_inner(), shared_key(), "default", 3600);
    assert_still_serves(&agent, pid, shared_key());
}

#[test]
fn calls_beyond_max_calls_per_connection_are_shed_with_resource_exhausted() {
    let dir = Dir::new();
    let agent = serve_with_limits(&dir, "max_calls_per_connection = 2\n");
    let pid = agent_pid(agent.socket());
    let socket = agent.socket().to_owned();
    let runtime = runtime();
    let busy = runtime.block_on(channel(&socket));
    let (mut releases, mut calls) = start_deferred(&runtime, &busy, 2);
    let mut client = TokenServiceClient::new(busy.clone());
    // The agent polls each stream's task in its own order, so the first
    // probes may race the deferred calls for the two slots: a probe may be
    // served (no deferred call holds a slot yet), or a deferred call may be
    // shed instead (it is replaced). A probe that is shed proves both
    // deferred calls hold the connection's two slots.
    let deadline = Instant::now() + DEADLINE;
    let shed = loop {
        for index in 0..calls.len() {
            if calls[index].is_finished() {
                let finished = runtime
                    .block_on(&mut calls[index])
                    .expect("a deferred task");
                assert_status(
                    finished,
                    Code::ResourceExhausted,
                    "Too many active requests for the connection",
                    "a deferred call that lost the race for a slot",
                );
                let (release, call) = start_deferred(&runtime, &busy, 1);
                releases[index] = release.into_iter().next().expect("one release");
                calls[index] = call.into_iter().next().expect("one call");
            }
        }
        match runtime.block_on(client.get_token(request("", None, None))) {
            Err(status) => break status,
            Ok(response) => {
                check_response(&response.into_inner(), shared_key(), "default", 3600);
                assert!(
                    Instant::now() < deadline,
                    "no call was shed with 2 calls in flight"
                );
            }
        }
        thread::sleep(POLL);
    };
    assert_status::<()>(
        Err(shed),
        Code::ResourceExhausted,
        "Too many active requests for the connection",
        "a third call on the connection",
    );
    // Another connection is unaffected meanwhile.
    let other = runtime
        .block_on(get_token_once(&socket, CALL_TIMEOUT))
        .expect("a call on another connection");
    check_response(&other, shared_key(), "default", 3600);
    for release in releases {
        release.send(()).expect("the call waits");
    }
    for call in calls {
        let response = runtime
            .block_on(call)
            .expect("the calling task")
            .expect("a released call");
        check_response(&response, shared_key(), "default", 3600);
    }
    let again = runtime
        .block_on(client.get_token(request("", None, None)))
        .expect("the connection serves again");
    check_response(&again.into_inner(), shared_key(), "default", 3600);
    assert_still_serves(&agent, pid, shared_key());
}

#[test]
fn a_call_whose_message_never_comes_is_cancelled_at_the_request_timeout() {
    let dir = Dir::new();
    let agent = serve_with_limits(&dir, "request_timeout = \"1s\"\n");
    let pid = agent_pid(agent.socket());
    let socket = agent.socket().to_owned();
    let runtime = runtime();
    let connection = runtime.block_on(channel(&socket));
    let (_never, never_released) = oneshot::channel();
    let result = runtime.block_on(async {
        tokio::time::timeout(
            DEADLINE,
            deferred_get_token(connection.clone(), never_released),
        )
        .await
        .expect("the agent ended the call")
    });
    assert_status(
        result,
        Code::Cancelled,
        "Timeout expired",
        "a call whose message never comes",
    );
    let response = runtime
        .block_on(TokenServiceClient::new(connection).get_token(request("", None, None)))
        .expect("the same connection serves");
    check_response(&response.into_inner(), shared_key(), "default", 3600);
    assert_still_serves(&agent, pid, shared_key());
}

#[test]
fn connections_beyond_max_connections_wait_until_one_closes() {
    let dir = Dir::new();
    let agent = serve_with_limits(&dir, "max_connections = 2\nhandshake_timeout = \"60s\"\n");
    let pid = agent_pid(agent.socket());
    let socket = agent.socket().to_owned();
    let mut held: Vec<UnixStream> = (0..2)
        .map(|_| stalled_connection(&socket, &PREFACE[..4]))
        .collect();
    wait_for_log(
        &agent,
        "connection limit reached; new connections wait until one closes",
    );
    let runtime = runtime();
    // The kernel queues the third connection; the agent does not take it.
    let waiting = runtime.block_on(get_token_once(&socket, Duration::from_secs(1)));
    assert!(
        waiting.is_err(),
        "a third connection was served: {waiting:?}"
    );
    held.pop();
    let response = wait_for_token(&socket, DEADLINE);
    check_response(&response, shared_key(), "default", 3600);
    drop(held);
    assert_still_serves(&agent, pid, shared_key());
}

#[test]
fn descriptor_exhaustion_pauses_accepting_without_spinning_and_recovers() {
    require_tool("prlimit", "apt-get install util-linux");
    let dir = Dir::new();
    // Held connections stay open (no handshake deadline) until released.
    let agent = serve_with_limits(&dir, "handshake_timeout = \"60s\"\n");
    let pid = agent_pid(agent.socket());
    let socket = agent.socket().to_owned();
    // Answered calls show the accept loop runs, so the connection cap was
    // derived from the limit at start, not from the one lowered below.
    assert_still_serves(&agent, pid, shared_key());
    let limit = open_fds(pid) + 6;
    let lowered = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .output()
        .expect("run prlimit");
    assert!(
        lowered.status.success(),
        "prlimit failed: {}",
        String::from_utf8_lossy(&lowered.stderr)
    );
    let held: Vec<UnixStream> = (0..30)
        .map(|_| stalled_connection(&socket, &PREFACE[..4]))
        .collect();
    let exhausted =
        "cannot accept connections now; pausing error=Too many open files (os error 24)";
    wait_for_log(&agent, exhausted);

    let warnings_before = agent.stderr().matches(exhausted).count();
    let (ticks_before, measured) = (cpu_ticks(pid), Instant::now());
    thread::sleep(Duration::from_secs(2));
    let (ticks, elapsed) = (cpu_ticks(pid) - ticks_before, measured.elapsed());
    let warnings_during = agent.stderr().matches(exhausted).count() - warnings_before;
    assert!(
        warnings_during > 0,
        "the agent was not out of descriptors during the measurement"
    );
    let share =
        ticks as f64 / rustix::param::clock_ticks_per_second() as f64 / elapsed.as_secs_f64();
    assert!(
        share < 0.2,
        "the agent used {:.0}% of a core while out of descriptors",
        share * 100.0
    );

    drop(held);
    let response = wait_for_token(&socket, Duration::from_secs(10));
    check_response(&response, shared_key(), "default", 3600);
    assert_still_serves(&agent, pid, shared_key());
}

// ---------------------------------------------------------------------------
// 3. Files changed under a running agent.
// ---------------------------------------------------------------------------

#[test]
fn key_file_deleted_or_replaced_on_disk_keeps_the_loaded_key_until_sighup() {
    let dir = Dir::new();
    let (old, new) = (shared_key(), pkcs1_key());
    let path = old.write(&dir, "private.pem");
    let agent = dir.serve(&path);
    let pid = agent_pid(agent.socket());
    let mut grpc = agent.grpc();
    check_response(&grpc.ok(request("", None, None)), old, "default", 3600);

    // Each new lifetime is a new signature, made with the key in memory.
    fs::remove_file(&path).expect("delete the key file");
    check_response(&grpc.ok(request("", Some(601), None)), old, "default", 601);
    new.write(&dir, "private.pem");
    check_response(&grpc.ok(request("", Some(602), None)), old, "default", 602);
    fs::write(&path, "overwritten\n").expect("overwrite the key file");
    check_response(&grpc.ok(request("", Some(603), None)), old, "default", 603);
    assert!(!agent.stderr().contains("reload"), "{}", agent.stderr());

    // Only SIGHUP reads the file again.
    new.write(&dir, "private.pem");
    agent.signal(Signal::HUP);
    let deadline = Instant::now() + DEADLINE;
    let rotated = loop {
        let response = grpc.ok(request("", Some(604), None));
        if response.key_id == new.key_id {
            break response;
        }
        assert!(Instant::now() < deadline, "SIGHUP did not load the new key");
        thread::sleep(POLL);
    };
    check_response(&rotated, &new, "default", 604);
    assert_still_serves(&agent, pid, &new);
}

#[test]
fn socket_file_deleted_or_replaced_stops_the_agent_with_exit_1() {
    let dir = Dir::new();
    let key = shared_key().write(&dir, "private.pem");
    let expected_log = "the socket file was deleted or replaced; stopping so the agent can be restarted on a new socket";

    // Deleted.
    let mut agent = dir.serve(&key);
    check_response(
        &agent.grpc().ok(request("", None, None)),
        shared_key(),
        "default",
        3600,
    );
    fs::remove_file(dir.socket()).expect("delete the socket file");
    let exit = agent.wait();
    assert_exit_1_naming_the_socket(&agent, exit, expected_log, &dir.socket());

    // Replaced by another socket: the agent stops and leaves it alone.
    let mut agent = dir.serve(&key);
    fs::remove_file(dir.socket()).expect("delete the socket file");
    let foreign = std::os::unix::net::UnixListener::bind(dir.socket()).expect("bind a socket");
    let inode = fs::symlink_metadata(dir.socket()).unwrap().ino();
    let exit = agent.wait();
    assert_exit_1_naming_the_socket(&agent, exit, expected_log, &dir.socket());
    assert_eq!(
        fs::symlink_metadata(dir.socket()).unwrap().ino(),
        inode,
        "the agent removed the socket that replaced its own"
    );
    drop(foreign);

    // Restarted, as systemd's Restart=on-failure would.
    let restarted = dir.serve(&key);
    let pid = agent_pid(restarted.socket());
    assert_still_serves(&restarted, pid, shared_key());
}

fn assert_exit_1_naming_the_socket(
    agent: &Agent<'_>,
    exit: std::process::ExitStatus,
    log: &str,
    socket: &Path,
) {
    let stderr = agent.stderr();
    let error = format!(
        "skykit-agent: error: the socket file {} was deleted or replaced while the agent ran",
        socket.display()
    );
    assert!(
        exit.code() == Some(1) && stderr.contains(log) && stderr.contains(&error),
        "expected exit 1 with {log:?} and {error:?}, got {exit}\n--- stderr ---\n{stderr}"
    );
}

// ---------------------------------------------------------------------------
// 4. The wall clock steps.
// ---------------------------------------------------------------------------

/// libfaketime (Debian package `faketime`), which the test preloads into
/// the agent; fails loudly when it is not installed.
fn libfaketime() -> PathBuf {
    let candidates = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ];
    let found = candidates
        .iter()
        .map(PathBuf::from)
        .find(|path| path.exists());
    let from_glob = || {
        fs::read_dir("/usr/lib")
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path().join("faketime/libfaketime.so.1"))
            .find(|path| path.exists())
    };
    found.or_else(from_glob).unwrap_or_else(|| {
        panic!(
            "libfaketime.so.1 is not installed under /usr/lib; this test needs it: apt-get install faketime"
        )
    })
}

/// Checks the signature with `key` and returns `(iat, exp)`, without
/// judging the times by this process's (real) clock.
fn claims_ignoring_the_clock(token: &str, key: &TestKey) -> (u64, u64) {
    let decoding = DecodingKey::from_rsa_pem(key.public_pem.as_bytes()).expect("an RSA public key");
    let mut validation = Validation::new(Algorithm::RS256);
    validation.validate_exp = false;
    validation.set_issuer(&[ISSUER]);
    validation.set_required_spec_claims(&["iss", "iat", "exp"]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(token, &decoding, &validation)
        .unwrap_or_else(|error| panic!("the token does not verify: {error}"))
        .claims;
    let number = |name: &str| {
        claims[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no integer {name} in {claims}"))
    };
    (number("iat"), number("exp"))
}

#[test]
fn wall_clock_steps_of_an_hour_never_serve_an_expired_token() {
    let library = libfaketime();
    let dir = Dir::new();
    let key = shared_key().write(&dir, "private.pem");
    let offset_file = dir.write("faketime", "+0\n");
    let mut command = dir.serve_command(&key, &[]);
    command
        .env("LD_PRELOAD", &library)
        .env("FAKETIME_TIMESTAMP_FILE", &offset_file)
        .env("FAKETIME_NO_CACHE", "1")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    let agent = dir.start(command);
    let pid = agent_pid(agent.socket());
    let mut grpc = agent.grpc();
    for (offset, seconds) in [("+0", 0i64), ("+1h", 3600), ("-1h", -3600), ("+0", 0)] {
        fs::write(&offset_file, format!("{offset}\n")).expect("step the agent's clock");
        // Two calls per lifetime: the first may re-sign, the second is
        // whatever the cache now serves.
        for lifetime in [3600u64, 600, 3600, 600] {
            let before = now_secs() as i64 + seconds;
            let response = grpc.ok(request("", Some(lifetime as i64), None));
            let after = now_secs() as i64 + seconds;
            let (iat, exp) = claims_ignoring_the_clock(&response.token, shared_key());
            assert_eq!(exp - iat, lifetime, "at {offset}: exp - iat");
            assert!(
                (before - 1..=after + 1).contains(&(iat as i64)),
                "at {offset}: iat {iat} is not the agent's faked now ({before}..={after})"
            );
            assert!(
                exp as i64 > after + (lifetime / 10) as i64,
                "at {offset}: an expired or nearly expired token was served: exp {exp}, faked now {after}"
            );
            assert_eq!(response.key_id, shared_key().key_id);
        }
    }
    assert!(
        agent.stderr().contains("signed new token"),
        "{}",
        agent.stderr()
    );
    fs::write(&offset_file, "+0\n").expect("reset the agent's clock");
    assert_still_serves(&agent, pid, shared_key());
}
