//! What the soak tests share: one test at a time, a temp dir and a scrubbed
//! environment per test, keys made by the real `keygen`, the real agent
//! kept serving, its memory and descriptors read from /proc, and token
//! verification with the public key alone.

use std::{
    fs::{self, File},
    future::Future,
    io,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, MutexGuard},
    thread,
    time::{Duration, Instant},
};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rustix::process::{Pid, Signal};
use skykit_agent::{
    client,
    proto::{
        GetStatusRequest, GetStatusResponse, GetTokenRequest,
        agent_service_client::AgentServiceClient, token_service_client::TokenServiceClient,
    },
};
use tempfile::TempDir;
use tonic::transport::Channel;

/// The binary under test, from the same (release) build as this target.
pub const BIN: &str = env!("CARGO_BIN_EXE_skykit-agent");
/// The issuer the agent signs for.
pub const ISSUER: &str = "soak@example.com";
/// How long starting, stopping or settling may take before a test gives up.
pub const DEADLINE: Duration = Duration::from_secs(30);
/// How often the polling loops look again.
const POLL: Duration = Duration::from_millis(20);

/// Runs the soak tests one at a time: each measures the agent's memory and
/// the machine's throughput, which another test beside it would disturb.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    // A failed test poisons the lock; the next test still runs.
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The client side's runtime: two workers, like the agent's on CI.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build the client runtime")
}

/// A temp dir of one test, removed when dropped.
pub struct Dir {
    temp: TempDir,
}

impl Dir {
    pub fn new() -> Dir {
        Dir {
            temp: tempfile::Builder::new()
                .prefix("skykit-soak-")
                .tempdir()
                .expect("create a temp dir"),
        }
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.temp.path().join(name)
    }

    /// The binary with only PATH, and HOME set to this directory.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .env("HOME", self.temp.path())
            .stdin(Stdio::null())
            .args(args);
        command
    }

    /// `skykit-agent keygen --out <dir>/<name>`.
    pub fn keygen(&self, name: &str) -> Key {
        let out = self.join(name);
        let output = self
            .command(&["keygen", "--out"])
            .arg(&out)
            .output()
            .expect("run skykit-agent keygen");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "keygen failed ({})\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let key_id = stdout
            .lines()
            .find_map(|line| line.strip_prefix("key_id: "))
            .unwrap_or_else(|| panic!("keygen printed no `key_id: ` line:\n{stdout}"))
            .to_owned();
        let public_pem = fs::read_to_string(out.join("public.pem")).expect("read public.pem");
        Key {
            private: out.join("private.pem"),
            decoding: DecodingKey::from_rsa_pem(public_pem.as_bytes())
                .expect("keygen's public.pem is an RSA public key"),
            key_id,
        }
    }

    /// `serve --socket <dir>/agent.sock --key KEY --issuer ISSUER` with
    /// the default limits, stdout and stderr in files; returns once the
    /// socket accepts connections.
    pub fn serve(&self, key: &Path) -> Agent {
        let socket = self.join("agent.sock");
        let stderr = self.join("agent.stderr");
        let child = self
            .command(&["serve", "--socket"])
            .arg(&socket)
            .arg("--key")
            .arg(key)
            .args(["--issuer", ISSUER])
            .stdout(File::create(self.join("agent.stdout")).expect("create agent.stdout"))
            .stderr(File::create(&stderr).expect("create agent.stderr"))
            .spawn()
            .expect("spawn skykit-agent serve");
        let mut agent = Agent {
            child,
            socket,
            stderr,
        };
        agent.wait_until_listening();
        agent
    }
}

/// A key made by `keygen`: the private key file, the public key and the
/// `key_id` keygen printed.
pub struct Key {
    pub private: PathBuf,
    pub decoding: DecodingKey,
    pub key_id: String,
}

impl Key {
    /// Whether `token` is an RS256 JWT for [`ISSUER`] signed by this key.
    pub fn verifies(&self, token: &str) -> Result<(), String> {
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["iss", "iat", "exp"]);
        jsonwebtoken::decode::<serde_json::Value>(token, &self.decoding, &validation)
            .map(drop)
            .map_err(|error| error.to_string())
    }
}

/// A running `skykit-agent serve`; stopped with SIGTERM (then killed) when
/// dropped.
pub struct Agent {
    child: Child,
    pub socket: PathBuf,
    stderr: PathBuf,
}

impl Agent {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the agent logged so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn signal(&self, signal: Signal) {
        rustix::process::kill_process(Pid::from_child(&self.child), signal)
            .expect("signal the agent");
    }

    /// The agent's resident memory (`VmRSS` in /proc/PID/status), in KiB.
    pub fn rss_kib(&self) -> u64 {
        let path = format!("/proc/{}/status", self.pid());
        let status =
            fs::read_to_string(&path).unwrap_or_else(|error| panic!("read {path}: {error}"));
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS line in {path}:\n{status}"))
    }

    /// The agent's open file descriptors (entries of /proc/PID/fd).
    ///
    /// The agent makes itself non-dumpable, so only root (CAP_SYS_PTRACE)
    /// may list them: run the soak tests as root, as CI does.
    pub fn open_fds(&self) -> usize {
        let path = format!("/proc/{}/fd", self.pid());
        match fs::read_dir(&path) {
            Ok(entries) => entries.count(),
            Err(error) if error.kind() == io::ErrorKind::PermissionDenied => panic!(
                "cannot list {path}: the agent is non-dumpable, so counting its descriptors needs root; run the soak tests as root (CI does)"
            ),
            Err(error) => panic!("cannot list {path}: {error}"),
        }
    }

    /// Fails the test with the agent's log if it has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("poll the agent") {
            panic!(
                "the agent exited ({status})\n--- stderr ---\n{}",
                self.stderr()
            );
        }
    }

    fn wait_until_listening(&mut self) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            self.assert_running();
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not listen on {} within {DEADLINE:?}\n--- stderr ---\n{}",
                self.socket.display(),
                self.stderr()
            );
            thread::sleep(POLL);
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = rustix::process::kill_process(Pid::from_child(&self.child), Signal::TERM);
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(POLL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/2 connection to the agent.
pub async fn connect(socket: &Path) -> Channel {
    client::channel(socket)
        .await
        .unwrap_or_else(|error| panic!("connect to {}: {error}", socket.display()))
}

/// A token service client on `channel`.
pub fn tokens(channel: &Channel) -> TokenServiceClient<Channel> {
    TokenServiceClient::new(channel.clone())
}

/// A request for the default identity with its default lifetime.
pub fn request() -> GetTokenRequest {
    GetTokenRequest::default()
}

/// `GetStatus` over `channel`.
pub async fn status(channel: &Channel) -> GetStatusResponse {
    AgentServiceClient::new(channel.clone())
        .get_status(GetStatusRequest {})
        .await
        .unwrap_or_else(|status| panic!("GetStatus failed: {status}"))
        .into_inner()
}

/// Polls `check` until it returns `Some`, failing with `what` and the last
/// value seen (from `check`'s `Err`) after [`DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what}: not within {DEADLINE:?}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// `part` of `whole` per second, for the test's report.
pub fn rate(part: u64, elapsed: Duration) -> f64 {
    part as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// The RSS allowance on top of 10%: allocator noise, measured. Reading
/// the agent's RSS after every 100,000 of the 1,000,000 calls gave values
/// that wander by up to 0.9 MiB between neighbouring readings and settle
/// with no trend (e.g. 12.2, 12.6, 12.3, 13.1, 13.1, 13.2, 13.2, 13.0,
/// 13.1, 13.1 MiB): glibc's per-thread arenas grow and trim in steps as
/// tokio moves tasks between threads. Against a base of about 12 MiB, 10%
/// alone (1.2 MiB) is within that noise. A real leak is far larger than
/// the allowance: one 64-byte allocation kept per call is 55 MiB over the
/// 900,000 calls after the first reading, and one 8 KiB buffer kept per
/// connection is 140 MiB over the 18,000 cycles after the first.
pub const RSS_SLACK_KIB: u64 = 1024;

/// Fails unless `after_kib` is at most 10% (plus [`RSS_SLACK_KIB`]) above
/// `before_kib`. Only growth fails: that is what a leak looks like, while
/// a smaller RSS later is the allocator returning memory.
pub fn assert_rss_within_10_percent(before_kib: u64, after_kib: u64, what: &str) {
    let limit = before_kib + before_kib / 10 + RSS_SLACK_KIB;
    assert!(
        after_kib <= limit,
        "{what}: the agent's RSS grew from {before_kib} KiB to {after_kib} KiB, more than 10% + {RSS_SLACK_KIB} KiB (limit {limit} KiB)"
    );
}
