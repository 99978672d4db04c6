//! The agent as a systemd service: socket activation, the readiness
//! protocol (`READY=1`, `RELOADING=1`, `WATCHDOG=1`, `STOPPING=1`), reload
//! on SIGHUP, `check` and `status`, keys from systemd credentials, and the
//! mode and group of the socket.
//!
//! No systemd runs here: `systemd-socket-activate` passes the socket, and a
//! datagram socket of the test plays systemd's notify socket. Tests that
//! switch users (`setpriv`), create groups or set ACLs need root, as CI runs
//! them; they fail, never skip, without root or a tool they need.

use crate::support::TestGroup;
use crate::support::require_tool;
use std::{
    fs, io,
    os::unix::{
        fs::{FileTypeExt, MetadataExt},
        net::{UnixDatagram, UnixStream},
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use rustix::process::{Pid, Signal};
use skykit_agent::proto::{GetTokenResponse, token_service_client::TokenServiceClient};
use tonic::transport::Channel;

use crate::support::*;

/// How often the polling loops look again.
const POLL: Duration = Duration::from_millis(10);
/// How long a reload may take to show in the tokens served.
const RELOAD_DEADLINE: Duration = Duration::from_secs(10);
/// `WATCHDOG_USEC` of the watchdog test: the agent pets every 100 ms.
const WATCHDOG_USEC: &str = "200000";
/// `O_NONBLOCK` as `/proc/PID/fdinfo` prints file flags (octal).
const O_NONBLOCK: u32 = 0o4000;

// ---------------------------------------------------------------------------
// Helpers of this module.
// ---------------------------------------------------------------------------

/// A process started without waiting for a socket (the tests here watch
/// for readiness themselves), killed when dropped.
struct Process {
    child: Option<Child>,
    stderr: PathBuf,
}

impl Process {
    /// Starts `command`, its stdout and stderr going to files in `dir`.
    fn spawn(dir: &Dir, mut command: Command, name: &str) -> Process {
        let stdout = dir.join(&format!("{name}.stdout"));
        let stderr = dir.join(&format!("{name}.stderr"));
        let child = command
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).expect("create a stdout file"))
            .stderr(fs::File::create(&stderr).expect("create a stderr file"))
            .spawn()
            .unwrap_or_else(|error| panic!("cannot spawn {command:?}: {error}"));
        Process {
            child: Some(child),
            stderr,
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_child(self.child.as_ref().expect("the process is running"))
    }

    fn signal(&self, signal: Signal) {
        rustix::process::kill_process(self.pid(), signal).expect("send a signal");
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Polls stderr until it contains `needle`; fails if the process exits
    /// first or [`DEADLINE`] passes.
    fn wait_for_log(&mut self, needle: &str) {
        let deadline = Instant::now() + DEADLINE;
        while !self.stderr().contains(needle) {
            let child = self.child.as_mut().expect("the process is running");
            if let Some(status) = child.try_wait().expect("poll the process") {
                panic!(
                    "the process exited ({status}) before logging {needle:?}\n--- stderr ---\n{}",
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log within {DEADLINE:?}\n--- stderr ---\n{}",
                self.stderr()
            );
            thread::sleep(POLL);
        }
    }

    /// Waits (within [`DEADLINE`]) for the process to exit.
    fn wait(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the process is running");
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = child.try_wait().expect("poll the process") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the process did not exit within {DEADLINE:?}\n--- stderr ---\n{}",
                    self.stderr()
                );
            }
            thread::sleep(POLL);
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The test's stand-in for systemd's notify socket (`NOTIFY_SOCKET`).
struct Notify {
    socket: UnixDatagram,
    path: PathBuf,
    /// Every message received so far, shown when an expectation fails.
    seen: Vec<String>,
}

impl Notify {
    fn bind(dir: &Dir) -> Notify {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        Notify {
            socket,
            path,
            seen: Vec::new(),
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// The next message, within [`DEADLINE`].
    fn next(&mut self, expecting: &str) -> String {
        self.socket
            .set_read_timeout(Some(DEADLINE))
            .expect("set a read timeout");
        let mut buffer = vec![0u8; 4096];
        match self.socket.recv(&mut buffer) {
            Ok(length) => {
                let message = String::from_utf8_lossy(&buffer[..length]).into_owned();
                self.seen.push(message.clone());
                message
            }
            Err(error) => panic!(
                "no notify message ({expecting}) within {DEADLINE:?}: {error}\nreceived so far: {:#?}",
                self.seen
            ),
        }
    }

    /// The next message, which must set every `fields` (`NAME=` checks that
    /// NAME is present, `NAME=VALUE` its exact value) and no other name
    /// than those in `allowed`.
    fn expect(&mut self, fields: &[&str], allowed: &[&str]) -> String {
        let message = self.next(&format!("{fields:?}"));
        let names: Vec<&str> = message
            .lines()
            .map(|line| line.split_once('=').map_or(line, |(name, _)| name))
            .collect();
        let missing: Vec<&&str> = fields
            .iter()
            .filter(|field| match field.strip_suffix('=') {
                Some(name) => !names.contains(&name),
                None => !message.lines().any(|line| line == **field),
            })
            .collect();
        let unexpected: Vec<&&str> = names
            .iter()
            .filter(|name| !allowed.contains(name))
            .collect();
        if !missing.is_empty() || !unexpected.is_empty() {
            panic!(
                "notify message {message:?} lacks {missing:?} or has unexpected {unexpected:?}\nreceived so far: {:#?}",
                self.seen
            );
        }
        message
    }

    /// Skips messages until one contains the line `line`.
    fn skip_until(&mut self, line: &str) -> String {
        loop {
            let message = self.next(line);
            if message.lines().any(|candidate| candidate == line) {
                return message;
            }
        }
    }

    /// Fails if any message is still queued (call after the sender exited).
    fn expect_no_more(&mut self) {
        self.socket
            .set_nonblocking(true)
            .expect("make the notify socket non-blocking");
        let mut buffer = vec![0u8; 4096];
        match self.socket.recv(&mut buffer) {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Ok(length) => panic!(
                "unexpected notify message {:?}\nreceived before: {:#?}",
                String::from_utf8_lossy(&buffer[..length]),
                self.seen
            ),
            Err(error) => panic!("cannot read the notify socket: {error}"),
        }
    }
}

/// The value of `NAME=` in a notify message.
fn field<'m>(message: &'m str, name: &str) -> Option<&'m str> {
    message
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix('='))
}

/// `setpriv` running the agent's binary as uid and gid 65534 (`nobody`),
/// with `group` as its only supplementary group, or none.
fn as_nobody(dir: &Dir, group: Option<u32>, args: &[&str]) -> Command {
    require_root("switch to uid 65534 with setpriv");
    require_tool("setpriv", "apt-get install util-linux");
    let mut command = Command::new("setpriv");
    scrub(&mut command, dir.path());
    command.arg(format!("--reuid={NOBODY}"));
    command.arg(format!("--regid={NOBODY}"));
    match group {
        Some(gid) => command.arg(format!("--groups={gid}")),
        None => command.arg("--clear-groups"),
    };
    command.arg("--").arg(BIN).args(args);
    command
}

/// Lets uid 65534 traverse the test's directory (temp dirs are 0700).
fn open_to_others(dir: &Dir) {
    chmod(dir.path(), 0o755);
}

/// A path as a `&str`, for argument lists.
fn text(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// A config of one default identity signing with `key` (relative to the
/// config): the top-level `settings`, then the identity with `admits` (its
/// `allow_*` lines; without them only root and the agent's uid may use it).
fn write_config(dir: &Dir, settings: &str, key: &str, admits: &str) -> PathBuf {
    dir.write_mode(
        "config.toml",
        format!("{settings}[[identity]]\nissuer = \"{ISSUER}\"\nkey = \"{key}\"\n{admits}"),
        0o644,
    )
}

/// Asserts that `haystack` holds each line of `lines`, showing it whole if not.
fn assert_lines(haystack: &str, lines: &[&str]) {
    let missing: Vec<&&str> = lines
        .iter()
        .filter(|line| !haystack.lines().any(|candidate| candidate == **line))
        .collect();
    assert!(
        missing.is_empty(),
        "missing lines {missing:?} in\n--- output ---\n{haystack}\n---"
    );
}

/// `skykit-agent status --socket SOCKET`, run as the test's user.
fn status(dir: &Dir, socket: &Path) -> std::process::Output {
    dir.run(&["status", "--socket", text(socket)])
}

// ---------------------------------------------------------------------------
// 1. Socket activation.
// ---------------------------------------------------------------------------

#[test]
fn socket_activation_serves_the_passed_socket_and_never_unlinks_it() {
    require_tool(
        "systemd-socket-activate",
        "apt-get install systemd (the tool, not a running systemd)",
    );
    let dir = Dir::new();
    let key = shared_key().write(&dir, "private.pem");
    let socket = dir.socket();
    let mut command = Command::new("systemd-socket-activate");
    scrub(&mut command, dir.path());
    // The same --socket the agent would bind: it must use the passed one
    // instead (binding would fail, since the path is live).
    command
        .arg("-l")
        .arg(&socket)
        .args([BIN, "serve", "--socket", text(&socket), "--key", text(&key)])
        .args(["--issuer", ISSUER]);
    let mut agent = Process::spawn(&dir, command, "activate");
    // It listens at once, and execs the agent at the first connection.
    agent.wait_for_log("Listening on");
    let inode = fs::symlink_metadata(&socket)
        .expect("systemd-socket-activate created the socket")
        .ino();

    // A client that connects before the agent runs gets its token.
    let stdout = assert_success(&dir.token(&[]));
    verify(stdout.trim_end(), &shared_key().public_pem, ISSUER, 3600);
    let log = agent.stderr();
    assert!(
        log.contains("activated=true"),
        "the agent did not serve the passed socket:\n{log}"
    );
    // systemd passes the socket blocking; the agent must make it
    // non-blocking. systemd-socket-activate exec'd the agent, so the pid is
    // the agent's, and the passed socket is fd 3.
    let fdinfo = fs::read_to_string(format!("/proc/{}/fdinfo/3", agent.pid().as_raw_nonzero()))
        .expect("read the agent's fdinfo of fd 3");
    let flags = fdinfo
        .lines()
        .find_map(|line| line.strip_prefix("flags:"))
        .map(|flags| u32::from_str_radix(flags.trim(), 8).expect("octal flags"))
        .unwrap_or_else(|| panic!("no flags in fdinfo:\n{fdinfo}"));
    assert_ne!(
        flags & O_NONBLOCK,
        0,
        "the passed socket is still blocking (flags {flags:o})"
    );
    check_response(
        &Grpc::connect(&socket).ok(request("", Some(600), None)),
        shared_key(),
        "default",
        600,
    );

    agent.signal(Signal::TERM);
    let exit = agent.wait();
    assert_eq!(
        exit.code(),
        Some(0),
        "SIGTERM ended the agent with {exit}\n--- stderr ---\n{}",
        agent.stderr()
    );
    let metadata = fs::symlink_metadata(&socket)
        .unwrap_or_else(|error| panic!("the agent removed the socket systemd passed: {error}"));
    assert!(metadata.file_type().is_socket());
    assert_eq!(metadata.ino(), inode, "the socket file was replaced");
}

// ---------------------------------------------------------------------------
// 2. Readiness protocol.
// ---------------------------------------------------------------------------

#[test]
fn notify_ready_after_listening_reloading_then_ready_on_sighup_stopping_on_sigterm() {
    let dir = Dir::new();
    let mut notify = Notify::bind(&dir);
    let mut command = dir.serve_command(&shared_key().write(&dir, "private.pem"), &[]);
    command.env("NOTIFY_SOCKET", notify.path());
    let mut agent = Process::spawn(&dir, command, "agent");
    let serving = format!("STATUS=serving default on {}", dir.socket().display());

    let ready = notify.expect(&["READY=1", &serving], &["READY", "STATUS"]);
    // READY=1 only once the socket listens: no retry here.
    if let Err(error) = UnixStream::connect(dir.socket()) {
        panic!("READY=1 ({ready:?}) came before the socket accepted: {error}");
    }
    check_response(
        &Grpc::connect(&dir.socket()).ok(request("", None, None)),
        shared_key(),
        "default",
        3600,
    );

    let mut previous = 0;
    for _ in 0..2 {
        agent.signal(Signal::HUP);
        let reloading = notify.expect(
            &["RELOADING=1", "MONOTONIC_USEC="],
            &["RELOADING", "MONOTONIC_USEC"],
        );
        let usec: u64 = field(&reloading, "MONOTONIC_USEC")
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("MONOTONIC_USEC is not a number in {reloading:?}"));
        assert!(
            usec > previous,
            "MONOTONIC_USEC {usec} is not after the previous reload's {previous}"
        );
        previous = usec;
        notify.expect(&["READY=1", &serving], &["READY", "STATUS"]);
    }

    agent.signal(Signal::TERM);
    notify.expect(&["STOPPING=1"], &["STOPPING", "STATUS"]);
    let exit = agent.wait();
    assert_eq!(exit.code(), Some(0), "{}", agent.stderr());
    // Without WATCHDOG_USEC nothing else was sent, no WATCHDOG=1 either.
    notify.expect_no_more();
}

/// Starts `command` with a watchdog and the notify socket, and expects
/// WATCHDOG=1 at least twice after READY=1.
fn check_watchdog(dir: &Dir, mut command: Command, name: &str) {
    let mut notify = Notify::bind(dir);
    command
        .env("NOTIFY_SOCKET", notify.path())
        .env("WATCHDOG_USEC", WATCHDOG_USEC);
    let mut agent = Process::spawn(dir, command, name);
    notify.expect(&["READY=1", "STATUS="], &["READY", "STATUS"]);
    for _ in 0..3 {
        notify.expect(&["WATCHDOG=1"], &["WATCHDOG"]);
    }
    agent.signal(Signal::TERM);
    notify.skip_until("STOPPING=1");
    assert_eq!(agent.wait().code(), Some(0), "{}", agent.stderr());
}

#[test]
fn watchdog_is_petted_repeatedly_when_watchdog_usec_is_set() {
    let dir = Dir::new();
    let key = shared_key().write(&dir, "private.pem");
    // WATCHDOG_PID unset: the watchdog is the agent's.
    check_watchdog(&dir, dir.serve_command(&key, &[]), "unset-pid");
    fs::remove_file(dir.join("notify.sock")).expect("remove the first notify socket");

    // WATCHDOG_PID set to the agent's own pid, as systemd does: a shell
    // learns its pid and execs the agent in its place.
    let mut command = Command::new("sh");
    scrub(&mut command, dir.path());
    command
        .args(["-c", "export WATCHDOG_PID=$$; exec \"$0\" \"$@\""])
        .args([
            BIN,
            "serve",
            "--socket",
            text(&dir.socket()),
            "--key",
            text(&key),
        ])
        .args(["--issuer", ISSUER]);
    check_watchdog(&dir, command, "own-pid");
}

// ---------------------------------------------------------------------------
// 3. Reload.
// ---------------------------------------------------------------------------

#[test]
fn sighup_after_a_key_rotated_on_disk_signs_with_the_new_key() {
    let dir = Dir::new();
    let (old, new) = (shared_key(), pkcs1_key());
    let path = old.write(&dir, "private.pem");
    let agent = dir.serve(&path);
    let mut grpc = agent.grpc();
    check_response(&grpc.ok(request("", None, None)), old, "default", 3600);

    new.write(&dir, "private.pem");
    assert_eq!(mode(&path), 0o600);
    agent.signal(Signal::HUP);
    let deadline = Instant::now() + RELOAD_DEADLINE;
    let rotated = loop {
        let response = grpc.ok(request("", None, None));
        if response.key_id != old.key_id {
            break response;
        }
        assert!(
            Instant::now() < deadline,
            "tokens still carry the old key_id {RELOAD_DEADLINE:?} after SIGHUP\n--- stderr ---\n{}",
            agent.stderr()
        );
        thread::sleep(POLL);
    };
    // Verifies with the new public key, new key_id; the old token is gone.
    check_response(&rotated, &new, "default", 3600);
    check_response(&grpc.ok(request("", Some(600), None)), &new, "default", 600);

    let report = assert_success(&status(&dir, &dir.socket()));
    assert!(
        report.contains(&format!("key_id {}", new.key_id)) && !report.contains(&old.key_id),
        "status does not show only the new key_id:\n{report}"
    );
    let reload = report
        .lines()
        .find(|line| line.starts_with("last reload: "))
        .unwrap_or_else(|| panic!("no reload line in:\n{report}"));
    assert!(reload.ends_with(" ok"), "{reload}");
}

#[test]
fn sighup_with_a_broken_key_keeps_the_old_key_and_status_exits_5() {
    let dir = Dir::new();
    let key = shared_key();
    let path = key.write(&dir, "private.pem");
    let mut notify = Notify::bind(&dir);
    let mut command = dir.serve_command(&path, &[]);
    command.env("NOTIFY_SOCKET", notify.path());
    let agent = dir.start(command);
    notify.expect(&["READY=1"], &["READY", "STATUS"]);
    let mut grpc = agent.grpc();
    check_response(&grpc.ok(request("", None, None)), key, "default", 3600);

    dir.write("private.pem", "this is not a key\n");
    agent.signal(Signal::HUP);
    notify.expect(&["RELOADING=1"], &["RELOADING", "MONOTONIC_USEC"]);
    // The failure is shown in STATUS= and READY=1 is sent again.
    let ready = notify.expect(&["READY=1", "STATUS="], &["READY", "STATUS"]);
    let reason = format!("signing key {} is not PEM", path.display());
    let shown = field(&ready, "STATUS").unwrap_or_default();
    assert!(
        shown.starts_with("reload failed") && shown.contains(&reason),
        "STATUS= does not show the failed reload: {shown:?}"
    );

    // The cached token and a newly signed one still verify with the old key.
    check_response(&grpc.ok(request("", None, None)), key, "default", 3600);
    check_response(&grpc.ok(request("", Some(600), None)), key, "default", 600);

    let output = status(&dir, &dir.socket());
    assert_exit(&output, 5, &["the last reload failed"]);
    let report = String::from_utf8_lossy(&output.stdout);
    let reload = report
        .lines()
        .find(|line| line.starts_with("last reload: "))
        .unwrap_or_else(|| panic!("no reload line in:\n{report}"));
    assert!(
        reload.contains(" FAILED: ") && reload.contains(&reason),
        "status does not give the reason of the failed reload:\n{report}"
    );
    assert_lines(&report, &["serving: yes"]);
    assert!(
        report.contains(&format!("key_id {}", key.key_id)),
        "{report}"
    );
    let log = agent.stderr();
    assert!(log.contains("reload failed"), "{log}");
}

/// An agent serving `keys[0]` with a notify socket, and a multi-threaded
/// runtime with a client over one connection to it.
struct Reloading<'d> {
    dir: &'d Dir,
    agent: Agent<'d>,
    notify: Notify,
    runtime: tokio::runtime::Runtime,
    client: TokenServiceClient<Channel>,
}

impl<'d> Reloading<'d> {
    fn start(dir: &'d Dir, keys: &[TestKey; 2]) -> Reloading<'d> {
        let path = keys[0].write(dir, "private.pem");
        let mut notify = Notify::bind(dir);
        // These tests force thousands of signatures on purpose; the
        // per-uid budget that normally stops that is raised.
        let config = dir.join("limits.toml");
        std::fs::write(
            &config,
            "[limits]\nnew_signatures_per_uid_per_minute = 1000000\n",
        )
        .expect("write the config");
        let config = config.display().to_string();
        let mut command = dir.serve_command(&path, &["--config", &config]);
        command.env("NOTIFY_SOCKET", notify.path());
        let agent = dir.start(command);
        notify.expect(&["READY=1"], &["READY", "STATUS"]);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("build a tokio runtime");
        let client = runtime
            .block_on(skykit_agent::client::connect_path(agent.socket()))
            .expect("connect to the agent");
        Reloading {
            dir,
            agent,
            notify,
            runtime,
            client,
        }
    }

    /// Writes `key` and sends SIGHUP; returns once READY=1 says it serves.
    fn reload(&mut self, key: &TestKey, round: usize) {
        key.write(self.dir, "private.pem");
        self.agent.signal(Signal::HUP);
        self.notify
            .expect(&["RELOADING=1"], &["RELOADING", "MONOTONIC_USEC"]);
        let ready = self
            .notify
            .expect(&["READY=1", "STATUS="], &["READY", "STATUS"]);
        assert!(
            field(&ready, "STATUS").is_some_and(|status| status.starts_with("serving ")),
            "reload {round} failed: {ready:?}\n--- stderr ---\n{}",
            self.agent.stderr()
        );
    }

    /// Starts a task making GetToken calls back to back until `stop`:
    /// lifetimes cycle through [`CYCLED_LIFETIMES`]; with `force_signing`
    /// each call asks `min_valid_for` = lifetime, which no cached token
    /// meets, so every call signs (and stores) a new token.
    fn calls(
        &self,
        stop: &Arc<AtomicBool>,
        count: &Arc<AtomicUsize>,
        force_signing: bool,
    ) -> Calls {
        let (stop, count, mut client) = (stop.clone(), count.clone(), self.client.clone());
        self.runtime.spawn(async move {
            let mut results = Vec::new();
            let mut call = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let lifetime = 60 + call % CYCLED_LIFETIMES;
                let min_valid_for = force_signing.then_some(lifetime as i64);
                let result = client
                    .get_token(request("", Some(lifetime as i64), min_valid_for))
                    .await
                    .map(tonic::Response::into_inner);
                results.push((lifetime, result));
                count.fetch_add(1, Ordering::SeqCst);
                call += 1;
            }
            results
        })
    }
}

/// The calls of one task: each lifetime and what it got.
type Calls = tokio::task::JoinHandle<Vec<(u64, Result<GetTokenResponse, tonic::Status>)>>;

/// The lifetimes the calls cycle through: most calls sign a new token, and
/// a few checking calls see every cache entry.
const CYCLED_LIFETIMES: u64 = 20;

/// Polls until `count` is `more` beyond what it was when called.
fn wait_for_calls(count: &AtomicUsize, more: usize) {
    let target = count.load(Ordering::SeqCst) + more;
    let deadline = Instant::now() + DEADLINE;
    while count.load(Ordering::SeqCst) < target {
        assert!(Instant::now() < deadline, "the calls stopped");
        thread::sleep(POLL);
    }
}

/// The key of the two that signed `response`.
fn signed_by<'k>(keys: &'k [TestKey; 2], response: &GetTokenResponse) -> &'k TestKey {
    keys.iter()
        .find(|key| key.key_id == response.key_id)
        .unwrap_or_else(|| panic!("a token of an unknown key_id {}", response.key_id))
}

#[test]
fn calls_in_flight_during_reloads_all_succeed() {
    let dir = Dir::new();
    let keys = [shared_key().clone(), pkcs1_key()];
    let mut agent = Reloading::start(&dir, &keys);
    let (stop, count) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let calls = agent.calls(&stop, &count, false);
    const RELOADS: usize = 6;
    for round in 1..=RELOADS {
        wait_for_calls(&count, 2);
        agent.reload(&keys[round % 2], round);
    }
    wait_for_calls(&count, 2);
    stop.store(true, Ordering::SeqCst);
    let results = agent.runtime.block_on(calls).expect("the calling task");

    let failed: Vec<_> = results
        .iter()
        .filter(|(_, result)| result.is_err())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} calls failed during reloads: {failed:#?}",
        failed.len(),
        results.len()
    );
    assert!(results.len() > RELOADS * 2, "only {} calls", results.len());
    for (lifetime, result) in &results {
        let response = result.as_ref().expect("checked above");
        check_response(response, signed_by(&keys, response), "default", *lifetime);
    }
}

#[test]
fn no_token_of_a_replaced_key_is_served_after_a_reload() {
    let dir = Dir::new();
    let keys = [shared_key().clone(), pkcs1_key()];
    let mut agent = Reloading::start(&dir, &keys);
    let mut grpc = agent.agent.grpc();
    let mut stale = Vec::new();
    const RELOADS: usize = 50;
    for round in 1..=RELOADS {
        // Signatures in flight while the new key is swapped in...
        let (stop, count) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        let calls = agent.calls(&stop, &count, true);
        wait_for_calls(&count, 2);
        agent.reload(&keys[round % 2], round);
        stop.store(true, Ordering::SeqCst);
        for (lifetime, result) in agent.runtime.block_on(calls).expect("the calling task") {
            let response = result.unwrap_or_else(|status| panic!("a call failed: {status:?}"));
            check_response(&response, signed_by(&keys, &response), "default", lifetime);
        }
        // ...must not leave tokens of the old key in the cache.
        let current = &keys[round % 2];
        for lifetime in 60..60 + CYCLED_LIFETIMES {
            let response = grpc.ok(request("", Some(lifetime as i64), None));
            check_response(&response, signed_by(&keys, &response), "default", lifetime);
            if response.key_id != current.key_id {
                stale.push(format!(
                    "after reload {round}: a {lifetime}s token of the replaced key"
                ));
            }
        }
    }
    assert!(
        stale.is_empty(),
        "the cache served tokens signed with a key a reload had replaced:\n{}",
        stale.join("\n")
    );
}

#[test]
fn check_exits_78_naming_the_file_for_each_broken_config() {
    let dir = Dir::new();
    shared_key().write(&dir, "private.pem");
    let bad_key = dir.write("bad.pem", "this is not a key\n");
    let cases: [(&str, String, String); 3] = [
        (
            "a key that is not PEM",
            format!("[[identity]]\nissuer = \"{ISSUER}\"\nkey = \"bad.pem\"\n"),
            format!("signing key {} is not PEM", bad_key.display()),
        ),
        (
            "an unknown key",
            format!(
                "colour = \"blue\"\n[[identity]]\nissuer = \"{ISSUER}\"\nkey = \"private.pem\"\n"
            ),
            "unknown key `colour`".to_owned(),
        ),
        (
            "no issuer",
            "[[identity]]\nkey = \"private.pem\"\n".to_owned(),
            "has no `issuer`".to_owned(),
        ),
    ];
    for (what, toml, reason) in cases {
        let config = dir.write("config.toml", toml);
        let output = dir.run(&["check", "--config", text(&config)]);
        let named = if reason.starts_with("signing key") {
            bad_key.display().to_string()
        } else {
            format!("{}:1: ", config.display())
        };
        assert!(
            output.stdout.is_empty(),
            "check printed for {what}: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        assert_exit(&output, EXIT_CONFIG, &[&named, &reason]);
    }
}

#[test]
fn check_prints_identities_and_key_ids_of_a_good_config() {
    let dir = Dir::new();
    let (alpha, beta) = (shared_key(), pkcs1_key());
    alpha.write(&dir, "alpha.pem");
    beta.write(&dir, "beta.pem");
    let config = dir.write(
        "config.toml",
        format!(
            "socket = \"agent.sock\"\n\
             [[identity]]\nname = \"alpha\"\nissuer = \"{ISSUER}\"\nkey = \"alpha.pem\"\n\
             [[identity]]\nname = \"beta\"\nissuer = \"{ISSUER}\"\nkey = \"beta.pem\"\nlifetime = \"10m\"\ndefault = true\n"
        ),
    );
    let stdout = assert_success(&dir.run(&["check", "--config", text(&config)]));
    assert_lines(
        &stdout,
        &[
            &format!("config ok: {}", config.display()),
            &format!("socket: {}", dir.socket().display()),
        ],
    );
    for identity in [
        format!(
            "identity alpha: iss {ISSUER}, key_id {}, 2048-bit key, default lifetime 1h",
            alpha.key_id
        ),
        format!(
            "identity beta: iss {ISSUER}, key_id {}, 2048-bit key, default lifetime 10m",
            beta.key_id
        ),
    ] {
        assert!(
            stdout.lines().any(|line| line.starts_with(&identity)),
            "no line starting {identity:?} in\n--- output ---\n{stdout}\n---"
        );
    }
    assert!(
        fs::symlink_metadata(dir.socket()).is_err(),
        "check bound the socket"
    );
}

#[test]
fn check_prints_sinks_metrics_and_proxy() {
    let dir = Dir::new();
    shared_key().write(&dir, "key.pem");
    let config = dir.write(
        "config.toml",
        format!(
            "socket = \"agent.sock\"\n\
             [[identity]]\nname = \"alpha\"\nissuer = \"{ISSUER}\"\nkey = \"key.pem\"\n\
             [[sink]]\npath = \"token\"\n\
             [[sink]]\npath = \"token.json\"\nidentity = \"alpha\"\nlifetime = \"10m\"\nformat = \"json\"\nmode = \"0600\"\n\
             [metrics]\nlisten = \"127.0.0.1:9464\"\n\
             [proxy]\nlisten = \"unix:proxy.sock\"\nupstream = \"http://127.0.0.1:8080\"\ntimeout = \"5s\"\n"
        ),
    );
    let stdout = assert_success(&dir.run(&["check", "--config", text(&config)]));
    assert_lines(
        &stdout,
        &[
            &format!(
                "sink {}: the default identity, the identity's default lifetime, format token, mode 0640",
                dir.path().join("token").display()
            ),
            &format!(
                "sink {}: identity alpha, lifetime 10m, format json, mode 0600",
                dir.path().join("token.json").display()
            ),
            "metrics: 127.0.0.1:9464",
            &format!(
                "proxy: unix:{} -> http://127.0.0.1:8080/ with the default identity's token, timeout 5s",
                dir.path().join("proxy.sock").display()
            ),
        ],
    );
    assert!(
        !dir.path().join("token").exists(),
        "check wrote a sink file"
    );
    let without = dir.write(
        "plain.toml",
        format!(
            "socket = \"agent.sock\"\n\
             [[identity]]\nname = \"alpha\"\nissuer = \"{ISSUER}\"\nkey = \"key.pem\"\n"
        ),
    );
    let stdout = assert_success(&dir.run(&["check", "--config", text(&without)]));
    assert_lines(&stdout, &["metrics: off", "proxy: off"]);
    assert!(!stdout.contains("sink "), "{stdout}");
}

// ---------------------------------------------------------------------------
// 4. Keys from systemd credentials.
// ---------------------------------------------------------------------------

#[test]
fn key_credential_is_read_from_credentials_directory_through_an_acl() {
    require_root("own the credential as root and run the agent as uid 65534");
    require_tool("setfacl", "apt-get install acl");
    let dir = Dir::new();
    open_to_others(&dir);
    let key = shared_key();
    // As systemd makes it: a root-owned 0400 file in its own directory.
    let credentials = dir.join("credentials");
    fs::create_dir(&credentials).expect("create the credentials directory");
    chmod(&credentials, 0o755);
    let credential = credentials.join("private.pem");
    fs::write(&credential, &key.private_pem).expect("write the credential");
    chmod(&credential, 0o400);
    assert_eq!(fs::metadata(&credential).unwrap().uid(), 0);
    let config = dir.write_mode(
        "config.toml",
        format!(
            "socket = \"run/agent.sock\"\n\
             [[identity]]\nissuer = \"{ISSUER}\"\nkey_credential = \"private.pem\"\n"
        ),
        0o644,
    );
    // The agent's uid must be able to create its socket.
    let run_dir = dir.join("run");
    fs::create_dir(&run_dir).expect("create the socket directory");
    std::os::unix::fs::chown(&run_dir, Some(NOBODY), Some(NOBODY)).expect("chown run/");
    let socket = run_dir.join("agent.sock");

    let nobody = |args: &[&str]| {
        let mut command = as_nobody(&dir, None, args);
        command.env("CREDENTIALS_DIRECTORY", &credentials);
        command
    };
    // Without the ACL, uid 65534 cannot read the root-only key.
    assert_exit(
        &run(nobody(&["check", "--config", text(&config)])),
        EXIT_CONFIG,
        &[
            &credential.display().to_string(),
            "permission denied for uid 65534",
        ],
    );

    let acl = Command::new("setfacl")
        .args(["-m", &format!("u:{NOBODY}:r")])
        .arg(&credential)
        .output()
        .expect("run setfacl");
    assert!(
        acl.status.success(),
        "setfacl failed: {}",
        String::from_utf8_lossy(&acl.stderr)
    );
    let checked = assert_success(&run(nobody(&["check", "--config", text(&config)])));
    assert!(
        checked.contains(&format!("key_id {}", key.key_id)),
        "{checked}"
    );

    let agent = dir.start_at(
        nobody(&[
            "serve",
            "--config",
            text(&config),
            "--socket",
            text(&socket),
        ]),
        &socket,
    );
    assert_eq!(
        fs::symlink_metadata(&socket).unwrap().uid(),
        NOBODY,
        "the agent does not run as uid 65534"
    );
    check_response(
        &agent.grpc().ok(request("", None, None)),
        key,
        "default",
        3600,
    );
}

#[test]
fn key_credential_without_credentials_directory_exits_78() {
    let dir = Dir::new();
    let config = dir.write(
        "config.toml",
        format!("[[identity]]\nissuer = \"{ISSUER}\"\nkey_credential = \"private.pem\"\n"),
    );
    let output = dir.run(&[
        "serve",
        "--config",
        text(&config),
        "--socket",
        text(&dir.socket()),
    ]);
    assert_exit(
        &output,
        EXIT_CONFIG,
        &[
            &config.display().to_string(),
            "key_credential \"private.pem\" needs $CREDENTIALS_DIRECTORY",
        ],
    );
    assert!(
        fs::symlink_metadata(dir.socket()).is_err(),
        "serve bound its socket"
    );
}

// ---------------------------------------------------------------------------
// 5. Socket mode and group.
// ---------------------------------------------------------------------------

#[test]
fn socket_group_members_get_tokens_and_others_are_refused() {
    let group = TestGroup::create("skykit-it");
    let dir = Dir::new();
    open_to_others(&dir);
    let key = shared_key();
    key.write(&dir, "private.pem");
    let config = write_config(
        &dir,
        &format!(
            "socket_mode = \"0660\"\nsocket_group = \"{}\"\n",
            group.name
        ),
        "private.pem",
        // The identity admits the group, so only the socket decides.
        &format!("allow_groups = [\"{}\"]\n", group.name),
    );
    let run_dir = dir.join("run");
    let socket = run_dir.join("agent.sock");
    let _agent = dir.start_at(
        dir.command(&[
            "serve",
            "--config",
            text(&config),
            "--socket",
            text(&socket),
        ]),
        &socket,
    );
    let metadata = fs::symlink_metadata(&socket).unwrap();
    assert_eq!(mode(&socket), 0o660, "the socket's mode");
    assert_eq!(metadata.gid(), group.gid, "the socket's group");
    let directory = fs::symlink_metadata(&run_dir).unwrap();
    assert_eq!(
        mode(&run_dir),
        0o750,
        "the mode of the directory the agent made"
    );
    assert_eq!(
        directory.gid(),
        group.gid,
        "the group of the directory the agent made"
    );
    let token = |group: Option<u32>| {
        run(as_nobody(
            &dir,
            group,
            &["token", "--socket", text(&socket)],
        ))
    };
    let member = assert_success(&token(Some(group.gid)));
    verify(member.trim_end(), &key.public_pem, ISSUER, 3600);
    // A non-member cannot even enter the directory...
    let refused = token(None);
    assert_exit(&refused, 3, &["permission denied for uid 65534"]);
    assert!(refused.stdout.is_empty());
    // ...and with the directory open, the socket's own mode keeps it out.
    chmod(&run_dir, 0o755);
    assert_exit(&token(None), 3, &["permission denied for uid 65534"]);
    let member = assert_success(&token(Some(group.gid)));
    verify(member.trim_end(), &key.public_pem, ISSUER, 3600);
}

// ---------------------------------------------------------------------------
// 6. status.
// ---------------------------------------------------------------------------

#[test]
fn status_of_a_healthy_agent_exits_0_with_identities_cache_and_reloads() {
    let dir = Dir::new();
    let key = shared_key();
    let _agent = dir.serve(&key.write(&dir, "private.pem"));
    let identity = format!(
        "  default (default): iss {ISSUER}, key_id {}, default lifetime 3600s",
        key.key_id
    );

    let report = assert_success(&status(&dir, &dir.socket()));
    assert_lines(
        &report,
        &[
            &format!(
                "skykit-agent {} on {}",
                env!("CARGO_PKG_VERSION"),
                dir.socket().display()
            ),
            "serving: yes",
            "identities:",
            &identity,
            "cache: 0 entries",
            "last reload: never",
        ],
    );

    let token = assert_success(&dir.token(&[]));
    let claims = verify(token.trim_end(), &key.public_pem, ISSUER, 3600);
    let report = assert_success(&status(&dir, &dir.socket()));
    assert_lines(
        &report,
        &[&identity, "cache: 1 entries", "last reload: never"],
    );
    let entry = format!(
        "  default 3600s: expires {}, refresh after ",
        rfc3339(claims.exp)
    );
    assert!(
        report.lines().any(|line| line.starts_with(&entry)),
        "no cache entry {entry:?} in:\n{report}"
    );
}

#[test]
fn status_for_another_uid_exits_4_permission_denied() {
    let dir = Dir::new();
    open_to_others(&dir);
    let key = shared_key();
    key.write(&dir, "private.pem");
    let config = write_config(
        &dir,
        "socket_mode = \"0666\"\n",
        "private.pem",
        &format!("allow_uids = [{NOBODY}]\n"),
    );
    let _agent = dir.start(dir.command(&[
        "serve",
        "--config",
        text(&config),
        "--socket",
        text(&dir.socket()),
    ]));
    assert_eq!(mode(&dir.socket()), 0o666);

    let socket = dir.socket();
    let output = run(as_nobody(
        &dir,
        None,
        &["status", "--socket", text(&socket)],
    ));
    assert_exit(
        &output,
        4,
        &["PermissionDenied", "uid 65534 may not read it"],
    );
    assert!(
        output.stdout.is_empty(),
        "status printed a report to uid 65534"
    );
    // The socket is open to it: only the status is refused.
    let token = assert_success(&run(as_nobody(
        &dir,
        None,
        &["token", "--socket", text(&socket)],
    )));
    verify(token.trim_end(), &key.public_pem, ISSUER, 3600);
}

#[test]
fn status_without_an_agent_exits_3() {
    let dir = Dir::new();
    let output = status(&dir, &dir.socket());
    assert_exit(
        &output,
        3,
        &[
            "cannot reach skykit-agent",
            &dir.socket().display().to_string(),
        ],
    );
}
