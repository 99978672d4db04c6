//! Helpers for the end-to-end tests: a temp dir and a scrubbed environment
//! per test, the real binary run once or kept serving as an [`Agent`],
//! gRPC calls from the test process, token verification that does not
//! trust the agent's own code, the keys the tests share, connections as
//! `nobody`, and systemd's tools run on the shipped units.

use std::{
    fs::{self, File},
    io::{self, Read, Seek},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{
    Algorithm, DecodingKey, EncodingKey, Validation,
    jwk::{Jwk, ThumbprintHash},
};
use prost_types::Timestamp;
use rustix::process::{Pid, Signal};
use skykit_agent::{
    key::{Bits, SigningKey},
    proto::{GetTokenRequest, GetTokenResponse, token_service_client::TokenServiceClient},
};
use tempfile::TempDir;
use tonic::transport::Channel;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_skykit-agent");
/// The issuer the tests register their keys for.
pub const ISSUER: &str = "you@example.com";
/// How long anything may take before a test gives up: generous, because
/// tests run in parallel on loaded CI machines.
pub const DEADLINE: Duration = Duration::from_secs(20);
/// The agent's exit code for a rejected config or key.
pub const EXIT_CONFIG: i32 = 78;
/// The exact JWS header every token must carry.
pub const HEADER_JSON: &str = r#"{"alg":"RS256","typ":"JWT"}"#;
/// The uid and gid of `nobody`, used when a test must not be root.
pub const NOBODY: u32 = 65534;
/// How often the polling loops look again.
const POLL: Duration = Duration::from_millis(10);

/// A temporary directory of one test, removed when dropped.
pub struct Dir {
    temp: TempDir,
}

impl Dir {
    pub fn new() -> Dir {
        Dir {
            temp: tempfile::Builder::new()
                .prefix("skykit-it-")
                .tempdir()
                .expect("create a temp dir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.temp.path()
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }

    /// The default socket path of the test's agent.
    pub fn socket(&self) -> PathBuf {
        self.join("agent.sock")
    }

    /// Writes a file of mode 0600 (as a key file must be), replacing any.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        self.write_mode(name, contents, 0o600)
    }

    /// Writes a file and sets its mode exactly (the umask does not apply).
    pub fn write_mode(&self, name: &str, contents: impl AsRef<[u8]>, mode: u32) -> PathBuf {
        let path = self.join(name);
        fs::write(&path, contents).expect("write a test file");
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod a test file");
        path
    }

    /// Copies `tests/fixtures/NAME` here with mode 0600 (git stores 0644).
    pub fn fixture(&self, name: &str) -> PathBuf {
        self.write(name, fixture(name))
    }

    /// The binary with a scrubbed environment: only PATH, and HOME set to
    /// this directory; tests add whatever else they need.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        scrub(&mut command, self.path());
        command.args(args);
        command
    }

    /// Runs the binary to completion (within [`DEADLINE`]).
    pub fn run(&self, args: &[&str]) -> Output {
        run(self.command(args))
    }

    /// `serve --socket <dir>/agent.sock --key KEY --issuer ISSUER` plus `extra`.
    pub fn serve_command(&self, key: &Path, extra: &[&str]) -> Command {
        let mut command = self.command(&["serve", "--socket"]);
        command
            .arg(self.socket())
            .arg("--key")
            .arg(key)
            .args(["--issuer", ISSUER])
            .args(extra);
        command
    }

    /// Starts an agent with `key` on [`Dir::socket`] and waits until it listens.
    pub fn serve(&self, key: &Path) -> Agent<'_> {
        self.start(self.serve_command(key, &[]))
    }

    /// Starts `command` (a `serve`) and waits until [`Dir::socket`] accepts.
    pub fn start(&self, command: Command) -> Agent<'_> {
        self.start_at(command, &self.socket())
    }

    /// Starts `command` (a `serve`) and waits until `socket` accepts.
    pub fn start_at(&self, mut command: Command, socket: &Path) -> Agent<'_> {
        static AGENTS: AtomicUsize = AtomicUsize::new(0);
        let number = AGENTS.fetch_add(1, Ordering::Relaxed);
        let stdout = self.join(&format!("agent-{number}.stdout"));
        let stderr = self.join(&format!("agent-{number}.stderr"));
        let child = command
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).expect("create the agent's stdout file"))
            .stderr(File::create(&stderr).expect("create the agent's stderr file"))
            .spawn()
            .expect("spawn skykit-agent serve");
        let mut agent = Agent {
            _dir: self,
            child: Some(child),
            socket: socket.to_owned(),
            stdout,
            stderr,
        };
        agent.wait_until_listening();
        agent
    }

    /// `token --socket <dir>/agent.sock` plus `extra`, run to completion.
    pub fn token(&self, extra: &[&str]) -> Output {
        let mut command = self.command(&["token", "--socket"]);
        command.arg(self.socket()).args(extra);
        run(command)
    }
}

/// Clears the environment but for PATH, and points HOME at `home`.
pub fn scrub(command: &mut Command, home: &Path) {
    command
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
        )
        .env("HOME", home)
        .stdin(Stdio::null());
}

/// Runs `command` to completion, killing it and failing the test if it
/// takes longer than [`DEADLINE`] (for example a `serve` that was expected
/// to refuse but started serving).
pub fn run(mut command: Command) -> Output {
    let mut stdout = tempfile::tempfile().expect("create a stdout file");
    let mut stderr = tempfile::tempfile().expect("create a stderr file");
    let mut child = command
        .stdout(stdout.try_clone().expect("dup stdout file"))
        .stderr(stderr.try_clone().expect("dup stderr file"))
        .spawn()
        .unwrap_or_else(|error| panic!("cannot spawn {command:?}: {error}"));
    let status = wait_with_deadline(&mut child);
    let read = |file: &mut File| {
        let mut bytes = Vec::new();
        file.rewind().expect("rewind an output file");
        file.read_to_end(&mut bytes).expect("read an output file");
        bytes
    };
    match status {
        Some(status) => Output {
            status,
            stdout: read(&mut stdout),
            stderr: read(&mut stderr),
        },
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{command:?} did not finish within {DEADLINE:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                String::from_utf8_lossy(&read(&mut stdout)),
                String::from_utf8_lossy(&read(&mut stderr)),
            );
        }
    }
}

/// The exit status once the child exits, `None` after [`DEADLINE`].
fn wait_with_deadline(child: &mut Child) -> Option<ExitStatus> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(status) = child.try_wait().expect("wait for a child") {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        thread::sleep(POLL);
    }
}

/// A running `skykit-agent serve`, killed when dropped. It borrows the
/// test's [`Dir`] so the directory outlives it.
pub struct Agent<'d> {
    _dir: &'d Dir,
    child: Option<Child>,
    socket: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Agent<'_> {
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// What the agent wrote to stderr so far (its logs and errors).
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// What the agent wrote to stdout so far.
    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// A gRPC client connected to the agent.
    pub fn grpc(&self) -> Grpc {
        Grpc::connect(&self.socket)
    }

    /// Sends `signal` to the agent.
    pub fn signal(&self, signal: Signal) {
        let child = self.child.as_ref().expect("the agent is running");
        rustix::process::kill_process(Pid::from_child(child), signal)
            .expect("send a signal to the agent");
    }

    /// Waits (within [`DEADLINE`]) for the agent to exit on its own.
    pub fn wait(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the agent is running");
        match wait_with_deadline(&mut child) {
            Some(status) => status,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the agent did not exit within {DEADLINE:?}\n--- stderr ---\n{}",
                    self.stderr()
                );
            }
        }
    }

    fn wait_until_listening(&mut self) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let child = self.child.as_mut().expect("the agent is running");
            if let Some(status) = child.try_wait().expect("poll the agent") {
                self.child = None;
                panic!(
                    "the agent exited ({status}) before listening on {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.socket.display(),
                    self.stdout(),
                    self.stderr()
                );
            }
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "the agent did not listen on {} within {DEADLINE:?}\n--- stderr ---\n{}",
                    self.socket.display(),
                    self.stderr()
                );
            }
            thread::sleep(POLL);
        }
    }
}

impl Drop for Agent<'_> {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A blocking gRPC client of the agent, for tests that are not async.
pub struct Grpc {
    runtime: tokio::runtime::Runtime,
    client: TokenServiceClient<Channel>,
}

impl Grpc {
    pub fn connect(socket: &Path) -> Grpc {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("build a tokio runtime");
        let client = runtime
            .block_on(skykit_agent::client::connect_path(socket))
            .unwrap_or_else(|error| panic!("cannot connect to {}: {error}", socket.display()));
        Grpc { runtime, client }
    }

    pub fn get_token(
        &mut self,
        request: GetTokenRequest,
    ) -> Result<GetTokenResponse, tonic::Status> {
        let client = &mut self.client;
        self.runtime
            .block_on(client.get_token(request))
            .map(tonic::Response::into_inner)
    }

    /// A call expected to succeed.
    pub fn ok(&mut self, request: GetTokenRequest) -> GetTokenResponse {
        self.get_token(request)
            .unwrap_or_else(|status| panic!("GetToken failed: {status:?}"))
    }
}

/// A request; `None` leaves the field unset.
pub fn request(
    identity: &str,
    lifetime: Option<i64>,
    min_valid_for: Option<i64>,
) -> GetTokenRequest {
    GetTokenRequest {
        identity: identity.to_owned(),
        lifetime: lifetime.map(seconds),
        min_valid_for: min_valid_for.map(seconds),
    }
}

/// A whole-second proto duration.
pub fn seconds(seconds: i64) -> prost_types::Duration {
    prost_types::Duration { seconds, nanos: 0 }
}

/// The claims of a verified token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claims {
    pub iat: u64,
    pub exp: u64,
}

/// Checks a token without trusting the agent's code: the signature with
/// jsonwebtoken against `public_pem`, and the header and payload bytes
/// exactly (`{"iss":ISSUER,"iat":N,"exp":N+lifetime}`, no spaces, no other
/// claims). `iat` must be recent by this process's clock.
pub fn verify(token: &str, public_pem: &str, issuer: &str, lifetime: u64) -> Claims {
    let segments: Vec<&str> = token.split('.').collect();
    assert_eq!(
        segments.len(),
        3,
        "a compact JWS has three segments: {token:?}"
    );
    let header = URL_SAFE_NO_PAD
        .decode(segments[0])
        .expect("header is unpadded base64url");
    eqnice(HEADER_JSON, &String::from_utf8_lossy(&header), "JWS header");
    let payload = URL_SAFE_NO_PAD
        .decode(segments[1])
        .expect("payload is unpadded base64url");
    let payload = String::from_utf8(payload).expect("payload is UTF-8");
    let parsed: serde_json::Value = serde_json::from_str(&payload).expect("payload is JSON");
    let iat = parsed["iat"]
        .as_u64()
        .unwrap_or_else(|| panic!("no integer iat in {payload}"));
    let exp = iat + lifetime;
    let issuer_json = serde_json::to_string(issuer).expect("encode the issuer");
    eqnice(
        &format!(r#"{{"iss":{issuer_json},"iat":{iat},"exp":{exp}}}"#),
        &payload,
        "JWT payload",
    );
    let now = now_secs();
    assert!(
        iat <= now && now - iat <= 120,
        "iat {iat} is not recent (now {now})"
    );

    let key =
        DecodingKey::from_rsa_pem(public_pem.as_bytes()).expect("the public key is an RSA PEM");
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_issuer(&[issuer]);
    validation.set_required_spec_claims(&["iss", "iat", "exp"]);
    let decoded = jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)
        .unwrap_or_else(|error| panic!("the token does not verify with the public key: {error}"));
    assert_eq!(decoded.header.alg, Algorithm::RS256);
    Claims { iat, exp }
}

/// Checks a whole response: the token with [`verify`], and that every
/// other field agrees with it.
pub fn check_response(
    response: &GetTokenResponse,
    key: &TestKey,
    identity: &str,
    lifetime: u64,
) -> Claims {
    let claims = verify(&response.token, &key.public_pem, ISSUER, lifetime);
    assert_eq!(
        response.issued_at,
        Some(timestamp(claims.iat)),
        "issued_at is iat, nanos 0"
    );
    assert_eq!(
        response.expires_at,
        Some(timestamp(claims.exp)),
        "expires_at is exp, nanos 0"
    );
    let refresh_after = response.refresh_after.expect("refresh_after is set");
    let refresh_after = refresh_after.seconds as f64 + f64::from(refresh_after.nanos) * 1e-9;
    let (earliest, latest) = (
        claims.iat as f64 + 0.45 * lifetime as f64,
        claims.iat as f64 + 0.55 * lifetime as f64,
    );
    assert!(
        (earliest..=latest).contains(&refresh_after),
        "refresh_after {refresh_after} is outside iat + lifetime x [0.45, 0.55] = [{earliest}, {latest}]"
    );
    assert_eq!(response.issuer, ISSUER);
    assert_eq!(response.identity, identity);
    assert_eq!(
        response.key_id, key.key_id,
        "key_id is the key's RFC 7638 thumbprint"
    );
    claims
}

pub fn timestamp(seconds: u64) -> Timestamp {
    Timestamp {
        seconds: seconds as i64,
        nanos: 0,
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs()
}

/// Polls the wall clock (no fixed sleep) until it reads a whole second
/// later than `second`.
pub fn wait_for_second_after(second: u64) {
    let deadline = Instant::now() + DEADLINE;
    while now_secs() <= second {
        assert!(
            Instant::now() < deadline,
            "the wall clock did not pass {second}"
        );
        thread::sleep(POLL);
    }
}

/// `secs` since the epoch as RFC 3339 UTC (`2023-11-14T22:13:20Z`),
/// computed here rather than by the crates under test.
pub fn rfc3339(secs: u64) -> String {
    // Howard Hinnant's civil_from_days.
    let days = (secs / 86_400) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    let time = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        time / 3600,
        time % 3600 / 60,
        time % 60
    )
}

/// A private key and what a test needs to check tokens it signed.
#[derive(Debug, Clone)]
pub struct TestKey {
    pub private_pem: String,
    pub public_pem: String,
    /// Computed with jsonwebtoken's RFC 7638 thumbprint, not the agent's code.
    pub key_id: String,
}

impl TestKey {
    /// Writes the private key into `dir` as NAME with mode 0600.
    pub fn write(&self, dir: &Dir, name: &str) -> PathBuf {
        dir.write(name, &self.private_pem)
    }
}

/// One PKCS#8 key generated with the library, shared by every test of the
/// run since RSA key generation is slow.
pub fn shared_key() -> &'static TestKey {
    static KEY: OnceLock<TestKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let key = SigningKey::generate(Bits::Rsa2048).expect("generate a key");
        let dir = Dir::new();
        let path = dir.join("private.pem");
        key.write_private_pem(&path).expect("write the key");
        let private_pem = fs::read_to_string(&path).expect("read the key back");
        TestKey {
            key_id: thumbprint(&private_pem),
            public_pem: key.public_key_pem(),
            private_pem,
        }
    })
}

/// The committed PKCS#1 key and its openssl-made public key.
pub fn pkcs1_key() -> TestKey {
    let private_pem = String::from_utf8(fixture("rsa2048-pkcs1.pem")).expect("the fixture is text");
    TestKey {
        key_id: thumbprint(&private_pem),
        public_pem: String::from_utf8(fixture("rsa2048-public.pem")).expect("the fixture is text"),
        private_pem,
    }
}

/// The RFC 7638 SHA-256 thumbprint of an RSA private key's public half,
/// unpadded base64url: what the agent calls `key_id`.
pub fn thumbprint(private_pem: &str) -> String {
    let key = EncodingKey::from_rsa_pem(private_pem.as_bytes()).expect("an RSA private key PEM");
    Jwk::from_encoding_key(&key, Algorithm::RS256)
        .expect("a JWK of the key")
        .thumbprint(ThumbprintHash::SHA256)
}

/// The bytes of `tests/fixtures/NAME`.
pub fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    fs::read(&path)
        .unwrap_or_else(|error| panic!("cannot read fixture {}: {error}", path.display()))
}

/// The `key_id: ...` line a command printed.
pub fn printed_key_id(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("key_id: "))
        .unwrap_or_else(|| panic!("no `key_id: ` line in:\n{stdout}"))
        .to_owned()
}

/// The first `BEGIN PUBLIC KEY` block a command printed, with its newline.
pub fn printed_public_pem(stdout: &str) -> String {
    let start = stdout
        .find("-----BEGIN PUBLIC KEY-----")
        .unwrap_or_else(|| panic!("no public key in:\n{stdout}"));
    let end_marker = "-----END PUBLIC KEY-----\n";
    let end = stdout[start..]
        .find(end_marker)
        .unwrap_or_else(|| panic!("no END line in:\n{stdout}"));
    stdout[start..start + end + end_marker.len()].to_owned()
}

/// Asserts the exit code and that stderr contains every `needle`, showing
/// both streams as blocks when it does not.
pub fn assert_exit(output: &Output, code: i32, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let missing: Vec<&&str> = needles
        .iter()
        .filter(|needle| !stderr.contains(**needle))
        .collect();
    if output.status.code() != Some(code) || !missing.is_empty() {
        panic!(
            "expected exit code {code} and stderr containing {needles:?}\n\
             got {} (missing {missing:?})\n--- stdout ---\n{}\n--- stderr ---\n{stderr}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
        );
    }
}

/// Asserts success and returns stdout.
pub fn assert_success(output: &Output) -> String {
    assert_exit(output, 0, &[]);
    String::from_utf8(output.stdout.clone()).expect("stdout is UTF-8")
}

/// Shows expected and actual as blocks, like ripgrep's `eqnice!`.
pub fn eqnice(expected: &str, actual: &str, what: &str) {
    if expected != actual {
        panic!("{what} differs\n--- expected ---\n{expected}\n--- actual ---\n{actual}\n---");
    }
}

/// Whether the tests run as root (CI does).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Fails, never skips, a test that needs root when it runs without it.
pub fn require_root(what: &str) {
    assert!(
        is_root(),
        "this test needs root ({what}); run the integration tests as root, as CI does"
    );
}

/// Sets a file's mode exactly.
pub fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|error| panic!("chmod {mode:o} {}: {error}", path.display()));
}

/// The mode bits (0o777 and above) of a path, not following symlinks.
pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(path)
        .unwrap_or_else(|error| panic!("stat {}: {error}", path.display()))
        .mode()
        & 0o7777
}

#[test]
fn rfc3339_matches_known_dates() {
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
}

/// Fails the test, naming how to install it, when `program` cannot run.
pub fn require_tool(program: &str, install: &str) {
    let spawned = Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if let Err(error) = spawned {
        panic!("cannot run `{program}`: {error}; this test needs it: {install}");
    }
}

/// A channel whose only connection is `stream`, already connected
/// (typically as another user): should it break, the channel fails instead
/// of reconnecting as the test's own user.
pub fn channel_over(
    runtime: &tokio::runtime::Runtime,
    stream: std::os::unix::net::UnixStream,
) -> Channel {
    stream
        .set_nonblocking(true)
        .expect("make the stream nonblocking");
    runtime
        .block_on(async move {
            let stream = tokio::net::UnixStream::from_std(stream).expect("register the stream");
            let once = std::sync::Arc::new(std::sync::Mutex::new(Some(stream)));
            tonic::transport::Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                    let stream = once.lock().unwrap().take();
                    async move {
                        stream.map(hyper_util::rt::TokioIo::new).ok_or_else(|| {
                            std::io::Error::other("the connection of another user broke")
                        })
                    }
                }))
                .await
        })
        .expect("open a channel over the connected stream")
}

/// A group made for one test with `groupadd`, removed again when dropped.
pub struct TestGroup {
    pub name: String,
    pub gid: u32,
}

impl TestGroup {
    /// Makes the group `PREFIX-PID`; each test module uses its own prefix.
    pub fn create(prefix: &str) -> TestGroup {
        require_root("create a group with groupadd");
        require_tool("groupadd", "apt-get install passwd");
        require_tool("groupdel", "apt-get install passwd");
        let name = format!("{prefix}-{}", std::process::id());
        let output = Command::new("groupadd")
            .arg("--")
            .arg(&name)
            .output()
            .expect("run groupadd");
        assert!(
            output.status.success(),
            "groupadd {name} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        // Dropped from here on, so a failed lookup still removes the group.
        let mut group = TestGroup { name, gid: 0 };
        group.gid = nix::unistd::Group::from_name(&group.name)
            .expect("look up the new group")
            .unwrap_or_else(|| panic!("groupadd made no group {}", group.name))
            .gid
            .as_raw();
        assert_ne!(group.gid, NOBODY, "the test group must not be nobody's");
        group
    }
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        let removed = Command::new("groupdel").arg("--").arg(&self.name).status();
        if !matches!(removed, Ok(status) if status.success()) && !std::thread::panicking() {
            panic!("cannot remove test group {}: {removed:?}", self.name);
        }
    }
}

/// Connects to `socket` as uid and gid 65534 with supplementary `groups`
/// (none for `&[]`), as the kernel records them for `SO_PEERCRED` and
/// `SO_PEERGROUPS`: from a thread of its own that drops to those
/// credentials with raw system calls, which (unlike libc's wrappers) change
/// only the calling thread on Linux. The thread ends right after, so
/// nothing else runs as that user; the connected socket then serves the
/// whole process.
pub fn connect_as_nobody(socket: &Path, groups: &[u32]) -> UnixStream {
    require_root("connect to the agent as uid 65534");
    let socket = socket.to_owned();
    let groups: Vec<libc::gid_t> = groups.to_vec();
    thread::spawn(move || {
        // SAFETY: plain system calls on this thread's own credentials,
        // with a valid pointer to `groups.len()` gids (the kernel reads
        // none for an empty list).
        let results = unsafe {
            [
                libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()),
                libc::syscall(libc::SYS_setresgid, NOBODY, NOBODY, NOBODY),
                libc::syscall(libc::SYS_setresuid, NOBODY, NOBODY, NOBODY),
            ]
        };
        assert_eq!(
            results,
            [0, 0, 0],
            "cannot switch a thread to uid 65534: {}",
            io::Error::last_os_error()
        );
        UnixStream::connect(&socket)
            .unwrap_or_else(|error| panic!("connect to {} as 65534: {error}", socket.display()))
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

// ---------------------------------------------------------------------------
// systemd's tools on the units in `systemd/`.
// ---------------------------------------------------------------------------

/// Where the shipped system units name the binary, replaced in the copies.
pub const SYSTEM_BINARY: &str = "/usr/bin/skykit-agent";

/// The repository's `systemd/` folder.
pub fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd")
}

/// `program` (one of systemd's tools) with a scrubbed environment, HOME at
/// `home`, and plain output; a missing tool fails the test, naming the
/// package to install. The tests need the tools, not a running systemd.
pub fn systemd_tool(program: &str, home: &Path) -> Command {
    require_tool(program, "apt-get install systemd");
    let mut command = Command::new(program);
    scrub(&mut command, home);
    // Plain ASCII output, no pager, no colours, whatever the caller's terminal.
    command
        .env("LANG", "C")
        .env("SYSTEMD_PAGER", "cat")
        .env("SYSTEMD_COLORS", "0");
    command
}

/// Runs `systemd-analyze ARGS` (see [`systemd_tool`]) with HOME at `dir`.
pub fn systemd_analyze(dir: &Dir, args: &[&str]) -> Output {
    let mut command = systemd_tool("systemd-analyze", dir.path());
    command.args(args);
    run(command)
}

/// The exit code and both streams of `output`, for failure messages.
pub fn describe(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    )
}

/// The system units of `systemd/` copied into `dir/units` with the built
/// binary, and `skykit-agent.service.d/DROP_IN` beside them, the way
/// systemd finds drop-ins; returns the socket, the service and the drop-in.
pub fn units_with_drop_in(dir: &Dir, drop_in: &str) -> (PathBuf, PathBuf, PathBuf) {
    let systemd = systemd_dir();
    let read = |name: &str| {
        fs::read_to_string(systemd.join(name))
            .unwrap_or_else(|error| panic!("cannot read systemd/{name}: {error}"))
    };
    let units = dir.join("units");
    fs::create_dir_all(units.join("skykit-agent.service.d")).expect("create the units dir");
    let socket = units.join("skykit-agent.socket");
    let service = units.join("skykit-agent.service");
    let drop_in = format!("skykit-agent.service.d/{drop_in}");
    let drop_in_copy = units.join(&drop_in);
    fs::write(&socket, read("skykit-agent.socket")).expect("copy the socket");
    // `%` starts a specifier in unit files; a literal one is written `%%`.
    fs::write(
        &service,
        read("skykit-agent.service").replace(SYSTEM_BINARY, &BIN.replace('%', "%%")),
    )
    .expect("copy the service");
    fs::write(&drop_in_copy, read(&drop_in)).expect("copy the drop-in");
    (socket, service, drop_in_copy)
}

/// Runs `systemd-analyze verify --man=no` (of the user manager if `user`)
/// on `units`, with a private runtime directory (a user manager needs one
/// for %t).
pub fn systemd_verify(dir: &Dir, user: bool, units: &[impl AsRef<Path>]) -> Output {
    let runtime = dir.join("xdg-runtime");
    fs::create_dir_all(&runtime).expect("create a runtime dir");
    let mut command = systemd_tool("systemd-analyze", dir.path());
    command
        .env("XDG_RUNTIME_DIR", &runtime)
        .args(["verify", "--man=no"]);
    if user {
        command.arg("--user");
    }
    command.args(units.iter().map(AsRef::as_ref));
    run(command)
}

/// Asserts that `output` (of `what`) is a success that printed nothing at
/// all: `systemd-analyze verify` exits 0 on some warnings.
pub fn assert_silent_success(output: &Output, what: &str) {
    assert!(
        output.status.success() && output.stdout.is_empty() && output.stderr.is_empty(),
        "{what} must succeed without a word:\n{}",
        describe(output)
    );
}

/// `systemd-analyze security --threshold` counts tenths: 10 is an exposure
/// of 1.0, the most the shipped units (and the sinks drop-in) may have.
pub const MAX_EXPOSURE_TENTHS: u32 = 10;

/// Runs `systemd-analyze security --offline=true` on `service`, failing
/// (exit status) above [`MAX_EXPOSURE_TENTHS`].
pub fn systemd_security(dir: &Dir, service: &Path) -> Output {
    let threshold = format!("--threshold={MAX_EXPOSURE_TENTHS}");
    let service = service.to_str().expect("a UTF-8 path");
    systemd_analyze(
        dir,
        &[
            "security",
            "--offline=true",
            &threshold,
            "--no-pager",
            service,
        ],
    )
}

/// Asserts that `systemd-analyze security` rates `service` (described as
/// `what`) at an exposure of 1.0 or lower; returns the exposure.
pub fn assert_exposure_at_most_1_0(dir: &Dir, service: &Path, what: &str) -> f64 {
    let output = systemd_security(dir, service);
    assert!(
        output.status.success(),
        "systemd-analyze security: exposure above {MAX_EXPOSURE_TENTHS} tenths {what}:\n{}",
        describe(&output)
    );
    let exposure = overall_exposure(&output);
    assert!(
        exposure <= 1.0,
        "exposure {exposure} is above 1.0:\n{}",
        describe(&output)
    );
    exposure
}

/// The overall exposure of `skykit-agent.service` that `systemd-analyze
/// security` printed in `output`.
pub fn overall_exposure(output: &Output) -> f64 {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let marker = "Overall exposure level for skykit-agent.service:";
    stdout
        .lines()
        .find_map(|line| line.split_once(marker))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no {marker:?} in the output:\n{}", describe(output)))
}
