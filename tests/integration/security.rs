//! Who may get which token, and a key nobody can pull out: the per-identity
//! peer-credential policy (`allow_uids`, `allow_gids`, `allow_users`,
//! `allow_groups`) with its audit lines, `ListIdentities` and the
//! `identities` command, the example config shipped with the systemd
//! units, and the protection of key memory (non-dumpable, no core files,
//! locked pages, nothing left after rotation, nothing in the logs).
//!
//! Every test here switches users with `setpriv`, creates groups, or reads
//! another process's memory through `/proc/PID/mem`, so they need root, as
//! CI runs them; they fail, never skip, without root or a tool they need.

use crate::support::require_tool;
use std::{
    fs,
    io::{BufRead, BufReader},
    os::unix::{
        fs::{FileExt, MetadataExt},
        net::UnixStream,
    },
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Output, Stdio},
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE},
};
use rustix::process::Signal;
use skykit_agent::{
    key::{Bits, SigningKey},
    proto::{
        GetStatusRequest, GetStatusResponse, GetTokenResponse, IdentityStatus,
        ListIdentitiesRequest, agent_service_client::AgentServiceClient,
        token_service_client::TokenServiceClient,
    },
};
use tonic::transport::Channel;

use crate::support::*;

/// How often the polling loops look again.
const POLL: Duration = Duration::from_millis(10);
/// The length of the piece of each prime the memory scan looks for.
const PIECE: usize = 32;
/// `SO_PEERPIDFD` (Linux 6.5), through which the agent reads a caller's
/// executable for its audit lines.
const SO_PEERPIDFD: libc::c_int = 77;
/// The group the example config and the sysusers file name.
const EXAMPLE_GROUP: &str = "skykit";

// ---------------------------------------------------------------------------
// Helpers of this module: users, groups and binaries.
// ---------------------------------------------------------------------------

/// A path as `&str`, for argument lists and configs.
fn text(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// Lets uid 65534 traverse the test's directory (temp dirs are 0700).
fn open_to_others(dir: &Dir) {
    chmod(dir.path(), 0o755);
}

/// Whether others (uid 65534) may execute `path`: the file and every
/// directory above it have the "others may execute/search" bit.
fn executable_by_others(path: &Path) -> bool {
    let others_x = |path: &Path| fs::metadata(path).is_ok_and(|meta| meta.mode() & 0o001 != 0);
    others_x(path) && path.ancestors().skip(1).all(others_x)
}

/// A path of the agent's binary that uid 65534 can execute: the build
/// output itself when others can reach it, else a hard link (or a copy)
/// inside the test's directory, which must be open to others.
fn binary_for_others(dir: &Dir) -> PathBuf {
    let binary = Path::new(BIN);
    if executable_by_others(binary) {
        return binary.to_owned();
    }
    let here = dir.join("skykit-agent");
    if fs::hard_link(binary, &here).is_err() {
        fs::copy(binary, &here).expect("copy the binary where uid 65534 can run it");
        chmod(&here, 0o755);
    }
    assert!(
        executable_by_others(&here),
        "uid 65534 cannot execute {}: open the test directory first",
        here.display()
    );
    here
}

/// `setpriv` that runs `program` as uid and gid 65534 with exactly
/// `groups` as supplementary groups, in a scrubbed environment.
fn as_nobody(dir: &Dir, groups: &[u32], program: &Path) -> Command {
    require_root("switch to uid 65534 with setpriv");
    require_tool("setpriv", "apt-get install util-linux");
    let mut command = Command::new("setpriv");
    scrub(&mut command, dir.path());
    command.arg(format!("--reuid={NOBODY}"));
    command.arg(format!("--regid={NOBODY}"));
    if groups.is_empty() {
        command.arg("--clear-groups");
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        command.arg(format!("--groups={}", list.join(",")));
    }
    command.arg("--").arg(program);
    command
}

/// Runs the agent's binary (a client command) as uid 65534 with `groups`.
fn client_as_nobody(dir: &Dir, groups: &[u32], args: &[&str]) -> Output {
    let mut command = as_nobody(dir, groups, &binary_for_others(dir));
    command.args(args);
    run(command)
}

/// The name of the user whose uid is 65534 (`nobody` on Debian).
fn nobody_name() -> String {
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(NOBODY))
        .expect("look up uid 65534")
        .unwrap_or_else(|| panic!("no user has uid {NOBODY}; this test needs one (`nobody`)"));
    user.name
}

/// Serializes `groupadd` and `groupdel` of this module's tests, which
/// otherwise race for the lock of /etc/group.
static GROUP_DATABASE: Mutex<()> = Mutex::new(());

/// A group for one test, removed again when dropped if the test made it.
struct TestGroup {
    name: String,
    gid: u32,
    created: bool,
}

impl TestGroup {
    /// A new group with a name no other test (or run) uses.
    fn create() -> TestGroup {
        static GROUPS: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "sksec-{}-{}",
            std::process::id(),
            GROUPS.fetch_add(1, Ordering::Relaxed)
        );
        let group = TestGroup::ensure(&name);
        assert!(group.created, "group {name} existed before the test");
        group
    }

    /// The group `name`, created (and later removed) if it does not exist.
    fn ensure(name: &str) -> TestGroup {
        require_root("create a group with groupadd");
        require_tool("groupadd", "apt-get install passwd");
        require_tool("groupdel", "apt-get install passwd");
        let _database = GROUP_DATABASE
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if let Some(gid) = gid_of(name) {
            return TestGroup {
                name: name.to_owned(),
                gid,
                created: false,
            };
        }
        group_tool("groupadd", name);
        // Dropped from here on, so a failed lookup still removes the group.
        let mut group = TestGroup {
            name: name.to_owned(),
            gid: u32::MAX,
            created: true,
        };
        group.gid = gid_of(name).unwrap_or_else(|| panic!("groupadd made no group {name}"));
        assert_ne!(group.gid, NOBODY, "a test group must not be nobody's group");
        group
    }
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        if self.created {
            let _database = GROUP_DATABASE
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            group_tool("groupdel", &self.name);
        }
    }
}

fn gid_of(name: &str) -> Option<u32> {
    nix::unistd::Group::from_name(name)
        .unwrap_or_else(|error| panic!("cannot look up group {name}: {error}"))
        .map(|group| group.gid.as_raw())
}

/// Runs `groupadd NAME` or `groupdel NAME`, retrying while another
/// process holds the group file's lock (exit code 10).
fn group_tool(tool: &str, name: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let output = Command::new(tool)
            .arg(name)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|error| panic!("cannot run {tool}: {error}"));
        if output.status.success() {
            return;
        }
        let busy = output.status.code() == Some(10);
        if !busy || Instant::now() > deadline {
            let message = format!(
                "{tool} {name} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
            if thread::panicking() {
                eprintln!("{message}");
                return;
            }
            panic!("{message}");
        }
        thread::sleep(POLL);
    }
}

/// Whether the kernel hands out a pidfd of a socket's peer, so the agent
/// can name a caller's executable in its audit lines.
fn kernel_has_peer_pidfd() -> bool {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let (one, _other) = UnixStream::pair().expect("create a socket pair");
    let mut fd: libc::c_int = -1;
    let mut size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the kernel writes at most one int into `fd`.
    let result = unsafe {
        libc::getsockopt(
            one.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut size,
        )
    };
    if result != 0 || fd < 0 {
        return false;
    }
    // SAFETY: the kernel just made this descriptor for us; close it.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    true
}

// ---------------------------------------------------------------------------
// Helpers: configs, agents, audit lines.
// ---------------------------------------------------------------------------

/// One `[[identity]]` section signing with `key`, plus `extra` lines.
fn identity(name: &str, issuer: &str, key: &Path, extra: &str) -> String {
    format!(
        "\n[[identity]]\nname = \"{name}\"\nissuer = \"{issuer}\"\nkey = \"{}\"\n{extra}",
        text(key)
    )
}

/// Writes `config.toml` (0644, so uid 65534 can read it too).
fn write_config(dir: &Dir, name: &str, toml: &str) -> PathBuf {
    dir.write_mode(name, toml, 0o644)
}

/// `serve --config CONFIG --socket SOCKET`, as the test's user (root).
fn serve_config(dir: &Dir, config: &Path, socket: &Path) -> Command {
    dir.command(&["serve", "--config", text(config), "--socket", text(socket)])
}

/// The agent's pid, as the kernel reports it to a client of its socket.
fn agent_pid(socket: &Path) -> u32 {
    let stream = UnixStream::connect(socket)
        .unwrap_or_else(|error| panic!("connect to {}: {error}", socket.display()));
    let credentials = rustix::net::sockopt::socket_peercred(&stream).expect("SO_PEERCRED");
    credentials.pid.as_raw_nonzero().get() as u32
}

/// One audit line of the agent (target `skykit_agent::audit`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Audit {
    identity: String,
    uid: u32,
    gid: u32,
    pid: Option<u32>,
    exe: Option<String>,
    decision: String,
}

/// Every audit line in an agent's stderr.
fn audits(stderr: &str) -> Vec<Audit> {
    stderr
        .lines()
        .filter(|line| line.contains(" skykit_agent::audit: audit "))
        .map(|line| {
            let number =
                |name: &str| log_field(line, name).and_then(|value| value.parse::<u32>().ok());
            Audit {
                identity: log_field(line, "identity")
                    .unwrap_or_else(|| panic!("no identity in audit line {line:?}")),
                uid: number("uid").unwrap_or_else(|| panic!("no uid in audit line {line:?}")),
                gid: number("gid").unwrap_or_else(|| panic!("no gid in audit line {line:?}")),
                pid: number("pid"),
                exe: log_field(line, "exe"),
                decision: log_field(line, "decision")
                    .unwrap_or_else(|| panic!("no decision in audit line {line:?}")),
            }
        })
        .collect()
}

/// The value of ` NAME=value` or ` NAME="value"` in a log line.
fn log_field(line: &str, name: &str) -> Option<String> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    let rest = &line[start..];
    if let Some(quoted) = rest.strip_prefix('"') {
        let mut value = String::new();
        let mut chars = quoted.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => value.extend(chars.next()),
                '"' => return Some(value),
                c => value.push(c),
            }
        }
        None
    } else {
        Some(
            rest.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned(),
        )
    }
}

/// The audit lines of `identity` for `uid` with `decision`; waits (within
/// [`DEADLINE`]) until there are at least `count`, then asserts exactly
/// `count`, showing the agent's stderr if not.
fn expect_audits(
    agent: &Agent<'_>,
    identity: &str,
    uid: u32,
    decision: &str,
    count: usize,
) -> Vec<Audit> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let stderr = agent.stderr();
        let found: Vec<Audit> = audits(&stderr)
            .into_iter()
            .filter(|audit| {
                audit.identity == identity && audit.uid == uid && audit.decision == decision
            })
            .collect();
        if found.len() >= count || Instant::now() > deadline {
            assert_eq!(
                found.len(),
                count,
                "expected {count} audit line(s) identity={identity} uid={uid} decision={decision}\n--- agent stderr ---\n{stderr}"
            );
            return found;
        }
        thread::sleep(POLL);
    }
}

/// Checks what an audit line of a `skykit-agent` client run as uid and
/// gid 65534 says besides the decision.
fn check_nobody_audit(audit: &Audit, client: &Path) {
    assert_eq!(audit.gid, NOBODY, "the caller's primary gid: {audit:?}");
    let pid = audit.pid.unwrap_or_else(|| panic!("no pid: {audit:?}"));
    assert!(pid > 1, "a real pid: {audit:?}");
    if kernel_has_peer_pidfd() {
        let exe = audit
            .exe
            .as_deref()
            .unwrap_or_else(|| panic!("no exe although the kernel has SO_PEERPIDFD: {audit:?}"));
        let expected = fs::canonicalize(client).expect("resolve the client's path");
        assert_eq!(
            Path::new(exe),
            expected,
            "the caller's executable: {audit:?}"
        );
    }
}

/// A gRPC connection for any of the agent's services.
struct Rpc {
    runtime: tokio::runtime::Runtime,
    channel: Channel,
}

impl Rpc {
    /// Connects as the test's user (root).
    fn connect(socket: &Path) -> Rpc {
        let runtime = runtime();
        let channel = runtime
            .block_on(skykit_agent::client::channel(socket))
            .unwrap_or_else(|error| panic!("cannot connect to {}: {error}", socket.display()));
        Rpc { runtime, channel }
    }

    /// Uses `stream`, already connected, as the only connection: should
    /// it break, the channel fails instead of reconnecting as another user.
    fn over(stream: UnixStream) -> Rpc {
        let runtime = runtime();
        let channel = crate::support::channel_over(&runtime, stream);
        Rpc { runtime, channel }
    }

    fn list(&self) -> Vec<IdentityStatus> {
        let mut client = TokenServiceClient::new(self.channel.clone());
        self.runtime
            .block_on(client.list_identities(ListIdentitiesRequest {}))
            .unwrap_or_else(|status| panic!("ListIdentities failed: {status:?}"))
            .into_inner()
            .identities
    }

    fn token(&self, identity: &str) -> Result<GetTokenResponse, tonic::Status> {
        let mut client = TokenServiceClient::new(self.channel.clone());
        self.runtime
            .block_on(client.get_token(request(identity, None, None)))
            .map(tonic::Response::into_inner)
    }

    fn token_with(&self, identity: &str, lifetime: Option<i64>) -> GetTokenResponse {
        let mut client = TokenServiceClient::new(self.channel.clone());
        self.runtime
            .block_on(client.get_token(request(identity, lifetime, None)))
            .unwrap_or_else(|status| panic!("GetToken {identity:?} failed: {status:?}"))
            .into_inner()
    }

    fn status(&self) -> GetStatusResponse {
        let mut client = AgentServiceClient::new(self.channel.clone());
        self.runtime
            .block_on(client.get_status(GetStatusRequest {}))
            .unwrap_or_else(|status| panic!("GetStatus failed: {status:?}"))
            .into_inner()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a tokio runtime")
}

// ---------------------------------------------------------------------------
// Helpers: keys and their primes.
// ---------------------------------------------------------------------------

/// A second PKCS#8 key generated for this module, so rotation and removal
/// leave a key behind whose primes nothing else in the agent holds.
fn fresh_key() -> &'static TestKey {
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

/// The DER inside a `BEGIN PRIVATE KEY` PEM.
fn pkcs8_der(key: &TestKey) -> Vec<u8> {
    assert!(
        key.private_pem.starts_with("-----BEGIN PRIVATE KEY-----"),
        "not a PKCS#8 PEM"
    );
    let base64: String = key
        .private_pem
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    STANDARD.decode(base64).expect("the PEM's base64 decodes")
}

/// The base64 lines of a PEM (what a leak of the file would show).
fn pem_lines(pem: &str) -> Vec<&str> {
    pem.lines()
        .filter(|line| !line.starts_with("-----") && !line.is_empty())
        .collect()
}

/// One DER element with `tag`: its contents and what follows it.
fn der_element(input: &[u8], tag: u8) -> (&[u8], &[u8]) {
    assert!(input.len() >= 2, "DER ends early");
    assert_eq!(input[0], tag, "unexpected DER tag");
    let (length, rest) = match input[1] {
        short if short < 0x80 => (usize::from(short), &input[2..]),
        long => {
            let count = usize::from(long & 0x7f);
            let bytes = &input[2..2 + count];
            let length = bytes
                .iter()
                .fold(0usize, |acc, &byte| (acc << 8) | usize::from(byte));
            (length, &input[2 + count..])
        }
    };
    rest.split_at(length)
}

/// The prime factors p and q of a PKCS#8 RSA key, big-endian magnitudes:
/// PrivateKeyInfo { version, algorithm, OCTET STRING { RSAPrivateKey {
/// version, n, e, d, p, q, ... } } }.
fn primes(pkcs8: &[u8]) -> [Vec<u8>; 2] {
    const SEQUENCE: u8 = 0x30;
    const INTEGER: u8 = 0x02;
    const OCTET_STRING: u8 = 0x04;
    let (info, _) = der_element(pkcs8, SEQUENCE);
    let (_version, rest) = der_element(info, INTEGER);
    let (_algorithm, rest) = der_element(rest, SEQUENCE);
    let (private_key, _) = der_element(rest, OCTET_STRING);
    let (mut fields, _) = der_element(private_key, SEQUENCE);
    let mut integers = Vec::new();
    for _ in 0..6 {
        let (integer, rest) = der_element(fields, INTEGER);
        let first = integer.iter().position(|&byte| byte != 0).unwrap_or(0);
        integers.push(integer[first..].to_vec());
        fields = rest;
    }
    let (p, q) = (integers[4].clone(), integers[5].clone());
    assert_eq!(
        (p.len(), q.len()),
        (128, 128),
        "a 2048-bit key has 1024-bit primes"
    );
    [p, q]
}

/// What the memory scan looks for: a 32-byte piece from the middle of each
/// prime, big-endian (as in the DER) and byte-reversed (as in aws-lc's
/// little-endian limbs), and 32 bytes of the key file's PEM text.
#[derive(Debug, Clone)]
struct KeyPieces {
    big_endian: [[u8; PIECE]; 2],
    little_endian: [[u8; PIECE]; 2],
    pem_text: [u8; PIECE],
}

impl KeyPieces {
    fn of(key: &TestKey) -> KeyPieces {
        let piece = |prime: &[u8]| -> [u8; PIECE] {
            let start = (prime.len() - PIECE) / 2;
            prime[start..start + PIECE].try_into().expect("32 bytes")
        };
        let [p, q] = primes(&pkcs8_der(key));
        let big_endian = [piece(&p), piece(&q)];
        let reversed = |piece: [u8; PIECE]| {
            let mut piece = piece;
            piece.reverse();
            piece
        };
        let lines = pem_lines(&key.private_pem);
        let middle = lines[lines.len() / 2].as_bytes();
        KeyPieces {
            little_endian: [reversed(big_endian[0]), reversed(big_endian[1])],
            big_endian,
            pem_text: middle[16..16 + PIECE]
                .try_into()
                .expect("a 64-character line"),
        }
    }

    /// The patterns, in the order of [`PATTERN_NAMES`].
    fn patterns(&self) -> Vec<[u8; PIECE]> {
        let mut patterns = self.big_endian.to_vec();
        patterns.extend(self.little_endian);
        patterns.push(self.pem_text);
        patterns
    }
}

/// Names of the patterns of [`KeyPieces::patterns`].
const PATTERN_NAMES: [&str; 5] = [
    "p big-endian",
    "q big-endian",
    "p little-endian",
    "q little-endian",
    "PEM text",
];

/// The patterns of the parsed key: the only ones allowed outside locked
/// memory, in no more copies than the crypto library itself makes.
const PARSED: [usize; 2] = [2, 3];

// ---------------------------------------------------------------------------
// Helpers: scanning a live process's memory.
// ---------------------------------------------------------------------------

/// Finds every occurrence of a few 32-byte patterns quickly even in an
/// unoptimized build: it looks at each aligned 8-byte word once, and only
/// words that a pattern contains (at one of the 8 shifts that put a pattern
/// start at or before the word) are checked further. Each occurrence is
/// counted exactly once, at the first aligned word at or after its start.
struct Finder {
    patterns: Vec<[u8; PIECE]>,
    /// One bit per hash of a word some pattern holds.
    filter: Vec<u64>,
    /// (word, pattern, shift): pattern[shift..shift + 8] is word.
    words: Vec<(u64, usize, usize)>,
}

impl Finder {
    fn new(patterns: &[[u8; PIECE]]) -> Finder {
        let mut finder = Finder {
            patterns: patterns.to_vec(),
            filter: vec![0; 1024],
            words: Vec::new(),
        };
        for (index, pattern) in patterns.iter().enumerate() {
            for shift in 0..8 {
                let word = u64::from_ne_bytes(pattern[shift..shift + 8].try_into().unwrap());
                let hash = Finder::hash(word);
                finder.filter[hash / 64] |= 1 << (hash % 64);
                finder.words.push((word, index, shift));
            }
        }
        finder
    }

    fn hash(word: u64) -> usize {
        (word.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 48) as usize
    }

    /// Calls `found(pattern, offset)` for every occurrence in `bytes`.
    fn find(&self, bytes: &[u8], mut found: impl FnMut(usize, usize)) {
        for (number, chunk) in bytes.chunks_exact(8).enumerate() {
            let word = u64::from_ne_bytes(chunk.try_into().unwrap());
            let hash = Finder::hash(word);
            if self.filter[hash / 64] & (1 << (hash % 64)) == 0 {
                continue;
            }
            let aligned = number * 8;
            for &(candidate, index, shift) in &self.words {
                if candidate != word || shift > aligned {
                    continue;
                }
                let start = aligned - shift;
                if bytes.get(start..start + PIECE) == Some(&self.patterns[index][..]) {
                    found(index, start);
                }
            }
        }
    }
}

/// Where one pattern was found.
#[derive(Debug, Clone)]
struct Hit {
    pattern: usize,
    address: u64,
    /// The mapping's line in `/proc/PID/maps`.
    mapping: String,
    /// `Locked:` of the mapping in `/proc/PID/smaps`, in kB.
    locked_kb: u64,
}

/// The result of reading a process's writable memory.
#[derive(Debug)]
struct Scan {
    pid: u32,
    hits: Vec<Hit>,
    mappings_read: usize,
    bytes_read: usize,
}

impl Scan {
    fn count(&self, pattern: usize) -> usize {
        self.hits
            .iter()
            .filter(|hit| hit.pattern == pattern)
            .count()
    }

    /// Whether both primes of the parsed key were found.
    fn sees_parsed_key(&self) -> bool {
        PARSED.iter().all(|&pattern| self.count(pattern) > 0)
    }

    fn describe(&self, names: &[&str]) -> String {
        let mut lines = vec![format!(
            "pid {}: {} writable mappings, {} bytes read",
            self.pid, self.mappings_read, self.bytes_read
        )];
        for hit in &self.hits {
            lines.push(format!(
                "  {} at {:#x}, Locked: {} kB, in {}",
                names[hit.pattern], hit.address, hit.locked_kb, hit.mapping
            ));
        }
        lines.join("\n")
    }
}

/// The `Locked:` value (kB) of each mapping, by start address.
fn locked_by_mapping(pid: u32) -> std::collections::HashMap<u64, u64> {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap_or_else(|error| panic!("read /proc/{pid}/smaps: {error}"));
    let mut locked = std::collections::HashMap::new();
    let mut current = None;
    for line in smaps.lines() {
        if let Some(start) = mapping_start(line) {
            current = Some(start);
        } else if let (Some(start), Some(value)) = (current, line.strip_prefix("Locked:")) {
            let kb = value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("unreadable smaps line {line:?}"));
            locked.insert(start, kb);
        }
    }
    locked
}

/// The start address of a maps/smaps header line (`start-end perms ...`).
fn mapping_start(line: &str) -> Option<u64> {
    let (range, _) = line.split_once(' ')?;
    let (start, end) = range.split_once('-')?;
    u64::from_str_radix(end, 16).ok()?;
    u64::from_str_radix(start, 16).ok()
}

/// Reads every readable and writable mapping of `pid` through
/// `/proc/PID/mem` (as root; mappings that cannot be read, such as
/// `[vvar]`, are skipped) and finds `patterns` in them.
fn scan(pid: u32, patterns: &[[u8; PIECE]]) -> Scan {
    require_root("read another process's memory through /proc/PID/mem");
    let maps = fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_else(|error| panic!("read /proc/{pid}/maps: {error}"));
    let locked = locked_by_mapping(pid);
    let mem = fs::File::open(format!("/proc/{pid}/mem"))
        .unwrap_or_else(|error| panic!("open /proc/{pid}/mem: {error}"));
    let finder = Finder::new(patterns);
    let mut result = Scan {
        pid,
        hits: Vec::new(),
        mappings_read: 0,
        bytes_read: 0,
    };
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !perms.starts_with("rw") {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (start, end) = (
            u64::from_str_radix(start, 16).expect("hex start"),
            u64::from_str_radix(end, 16).expect("hex end"),
        );
        let mut bytes = vec![0u8; (end - start) as usize];
        if mem.read_exact_at(&mut bytes, start).is_err() {
            continue;
        }
        result.mappings_read += 1;
        result.bytes_read += bytes.len();
        let locked_kb = locked.get(&start).copied().unwrap_or(0);
        finder.find(&bytes, |pattern, offset| {
            result.hits.push(Hit {
                pattern,
                address: start + offset as u64,
                mapping: line.to_owned(),
                locked_kb,
            })
        });
    }
    assert!(
        result.mappings_read > 0 && result.bytes_read > 0,
        "read no memory of pid {pid}"
    );
    result
}

/// The example `parsed_key_holder`, built now: `cargo test` builds
/// examples, but `cargo test --test integration` does not. Cargo does not
/// hold its build lock while tests run, and the build is a no-op when the
/// example is up to date.
fn control_binary() -> PathBuf {
    // target/PROFILE/deps/integration-HASH -> target/PROFILE
    let profile_dir = std::env::current_exe()
        .expect("the test binary's path")
        .parent()
        .and_then(Path::parent)
        .expect("target/PROFILE/deps/..")
        .to_owned();
    let profile = match profile_dir.file_name().and_then(|name| name.to_str()) {
        Some("debug") => "dev",
        Some(other) => other,
        None => panic!("no profile directory above the test binary"),
    };
    let output = Command::new(env!("CARGO"))
        .args([
            "build",
            "--offline",
            "--quiet",
            "--example",
            "parsed_key_holder",
        ])
        .args(["--profile", profile])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .output()
        .expect("run cargo to build the example parsed_key_holder");
    assert!(
        output.status.success(),
        "cannot build the example parsed_key_holder ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let binary = profile_dir.join("examples/parsed_key_holder");
    assert!(
        binary.exists(),
        "cargo built the example, but not at {}",
        binary.display()
    );
    binary
}

/// The control process: the example `parsed_key_holder`, which holds only
/// aws-lc's parsed form of a key. Ends when dropped.
struct Control {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Control {
    fn start(der: &Path) -> Control {
        let binary = control_binary();
        let mut child = Command::new(&binary)
            .arg(der)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|error| panic!("spawn {}: {error}", binary.display()));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let (sender, receiver) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = sender.send(line);
        });
        let mut control = Control { child, stdin };
        match receiver.recv_timeout(DEADLINE) {
            Ok(line) if line == "ready\n" => control,
            other => {
                let _ = control.child.kill();
                panic!("the control process did not get ready: {other:?}");
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + DEADLINE;
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(POLL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls GetToken for `identity` until it carries `key_id`.
fn wait_for_key_id(agent: &Agent<'_>, rpc: &Rpc, identity: &str, key_id: &str) -> GetTokenResponse {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let response = rpc.token_with(identity, None);
        if response.key_id == key_id {
            return response;
        }
        assert!(
            Instant::now() < deadline,
            "tokens still carry key_id {} {DEADLINE:?} after SIGHUP, not {key_id}\n--- agent stderr ---\n{}",
            response.key_id,
            agent.stderr()
        );
        thread::sleep(POLL);
    }
}

/// Asserts that the key's file text and big-endian primes (the forms of
/// the file and the DER) were found only in locked memory, if at all.
fn assert_raw_forms_locked(scan: &Scan, what: &str) {
    let unlocked: Vec<&Hit> = scan
        .hits
        .iter()
        .filter(|hit| !PARSED.contains(&hit.pattern) && hit.locked_kb == 0)
        .collect();
    assert!(
        unlocked.is_empty(),
        "{what}: raw key bytes lie in memory that is not locked:\n{}",
        scan.describe(&PATTERN_NAMES)
    );
}

/// Asserts that a scan for a key's patterns found nothing, in either
/// byte order.
fn assert_no_trace(scan: &Scan, what: &str) {
    assert!(
        scan.hits.is_empty(),
        "{what}: the old key's primes are still in the agent's memory\n{}",
        scan.describe(&PATTERN_NAMES)
    );
}

// ---------------------------------------------------------------------------
// 1. Policy: refused by default, admitted by uid, group and user.
// ---------------------------------------------------------------------------

#[test]
fn policy_refuses_other_uids_by_default_and_admits_by_uid_supplementary_group_and_user() {
    require_root("run clients as uid 65534");
    let group = TestGroup::create();
    let dir = Dir::new();
    open_to_others(&dir);
    let key = shared_key();
    let key_path = key.write(&dir, "private.pem");
    let config = write_config(
        &dir,
        "config.toml",
        &[
            "socket_mode = \"0666\"\n".to_owned(),
            identity("closed", ISSUER, &key_path, "default = true\n"),
            identity(
                "by-uid",
                ISSUER,
                &key_path,
                &format!("allow_uids = [{NOBODY}]\n"),
            ),
            identity(
                "by-group",
                ISSUER,
                &key_path,
                &format!("allow_groups = [\"{}\"]\n", group.name),
            ),
            identity(
                "by-user",
                ISSUER,
                &key_path,
                &format!("allow_users = [\"{}\"]\n", nobody_name()),
            ),
        ]
        .concat(),
    );
    let agent = dir.start(serve_config(&dir, &config, &dir.socket()));
    let socket = text(agent.socket());
    let client = binary_for_others(&dir);

    // Without allow_* keys: only the agent's user (root) and root.
    let refused = client_as_nobody(&dir, &[], &["token", "--socket", socket]);
    assert_exit(
        &refused,
        4,
        &["PermissionDenied", "uid 65534", "identity \"closed\""],
    );
    assert!(refused.stdout.is_empty(), "a refusal prints no token");
    let denied = expect_audits(&agent, "closed", NOBODY, "deny", 1);
    check_nobody_audit(&denied[0], &client);
    let own = assert_success(&dir.run(&["token", "--socket", socket]));
    verify(own.trim_end(), &key.public_pem, ISSUER, 3600);
    expect_audits(&agent, "closed", 0, "allow", 1);

    // allow_uids.
    let admitted = client_as_nobody(
        &dir,
        &[],
        &["token", "--socket", socket, "--identity", "by-uid"],
    );
    verify(
        assert_success(&admitted).trim_end(),
        &key.public_pem,
        ISSUER,
        3600,
    );
    let allowed = expect_audits(&agent, "by-uid", NOBODY, "allow", 1);
    check_nobody_audit(&allowed[0], &client);

    // allow_groups, through a supplementary group only (primary gid 65534).
    let by_group = ["token", "--socket", socket, "--identity", "by-group"];
    let member = client_as_nobody(&dir, &[group.gid], &by_group);
    verify(
        assert_success(&member).trim_end(),
        &key.public_pem,
        ISSUER,
        3600,
    );
    let allowed = expect_audits(&agent, "by-group", NOBODY, "allow", 1);
    check_nobody_audit(&allowed[0], &client);
    let outsider = client_as_nobody(&dir, &[], &by_group);
    assert_exit(&outsider, 4, &["uid 65534", "identity \"by-group\""]);
    let denied = expect_audits(&agent, "by-group", NOBODY, "deny", 1);
    check_nobody_audit(&denied[0], &client);

    // allow_users, resolved when the config loads.
    let by_user = client_as_nobody(
        &dir,
        &[],
        &["token", "--socket", socket, "--identity", "by-user"],
    );
    verify(
        assert_success(&by_user).trim_end(),
        &key.public_pem,
        ISSUER,
        3600,
    );
    expect_audits(&agent, "by-user", NOBODY, "allow", 1);

    // Nothing else was audited for 65534.
    let all: Vec<Audit> = audits(&agent.stderr())
        .into_iter()
        .filter(|audit| audit.uid == NOBODY)
        .collect();
    assert_eq!(all.len(), 5, "audit lines for uid 65534: {all:#?}");
}

// ---------------------------------------------------------------------------
// 2. Listing: a caller sees and uses only the identities it is admitted to.
// ---------------------------------------------------------------------------

#[test]
fn callers_list_and_use_only_the_identities_their_policy_admits() {
    require_root("run clients as uid 65534");
    let dir = Dir::new();
    open_to_others(&dir);
    let (open_key, closed_key) = (shared_key(), pkcs1_key());
    let open_path = open_key.write(&dir, "open.pem");
    let closed_path = closed_key.write(&dir, "closed.pem");
    let open_issuer = "open@example.com";
    let config = write_config(
        &dir,
        "config.toml",
        &[
            "socket_mode = \"0666\"\n".to_owned(),
            identity(
                "open",
                open_issuer,
                &open_path,
                // A policy replaces the default, so root must be listed too.
                &format!("allow_uids = [{NOBODY}, 0]\nlifetime = \"10m\"\n"),
            ),
            identity("closed", ISSUER, &closed_path, "default = true\n"),
        ]
        .concat(),
    );
    let agent = dir.start(serve_config(&dir, &config, &dir.socket()));
    let socket = text(agent.socket());
    let open_line = format!(
        "open: iss {open_issuer}, key_id {}, default lifetime 600s",
        open_key.key_id
    );
    let closed_line = format!(
        "closed (default): iss {ISSUER}, key_id {}, default lifetime 3600s",
        closed_key.key_id
    );

    // The command line.
    let listed = assert_success(&client_as_nobody(
        &dir,
        &[],
        &["identities", "--socket", socket],
    ));
    eqnice(
        &format!("{open_line}\n"),
        &listed,
        "identities as uid 65534",
    );
    let listed = assert_success(&dir.run(&["identities", "--socket", socket]));
    eqnice(
        &format!("{open_line}\n{closed_line}\n"),
        &listed,
        "identities as root",
    );
    let used = client_as_nobody(
        &dir,
        &[],
        &["token", "--socket", socket, "--identity", "open"],
    );
    verify(
        assert_success(&used).trim_end(),
        &open_key.public_pem,
        open_issuer,
        600,
    );
    let refused = client_as_nobody(
        &dir,
        &[],
        &["token", "--socket", socket, "--identity", "closed"],
    );
    assert_exit(&refused, 4, &["uid 65534", "identity \"closed\""]);
    assert!(refused.stdout.is_empty());

    // The RPC, on a connection whose peer credentials are uid 65534.
    let nobody = Rpc::over(connect_as_nobody(agent.socket(), &[]));
    let listed = nobody.list();
    assert_eq!(
        listed,
        [IdentityStatus {
            name: "open".to_owned(),
            issuer: open_issuer.to_owned(),
            key_id: open_key.key_id.clone(),
            default_lifetime: Some(seconds(600)),
            default: false,
        }],
        "ListIdentities as uid 65534"
    );
    let root = Rpc::connect(agent.socket());
    let names: Vec<(String, String)> = root
        .list()
        .into_iter()
        .map(|identity| (identity.name, identity.key_id))
        .collect();
    assert_eq!(
        names,
        [
            ("open".to_owned(), open_key.key_id.clone()),
            ("closed".to_owned(), closed_key.key_id.clone())
        ],
        "ListIdentities as root"
    );

    // Two calls on one connection: one allow line; every refusal audited.
    for _ in 0..2 {
        let response = nobody.token("open").expect("uid 65534 may use `open`");
        verify(&response.token, &open_key.public_pem, open_issuer, 600);
        let status = nobody
            .token("closed")
            .expect_err("uid 65534 may not use `closed`");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains("uid 65534") && status.message().contains("\"closed\""),
            "the refusal names the uid and the identity: {status:?}"
        );
    }
    expect_audits(&agent, "open", NOBODY, "allow", 2);
    expect_audits(&agent, "closed", NOBODY, "deny", 3);
}

// ---------------------------------------------------------------------------
// 3. The example config of the systemd units.
// ---------------------------------------------------------------------------

#[test]
fn example_config_gives_skykit_members_tokens_and_refuses_everyone_else() {
    require_root("create the skykit group and run clients as uid 65534");
    let group = TestGroup::ensure(EXAMPLE_GROUP);
    let dir = Dir::new();
    chmod(dir.path(), 0o711);
    let example =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/config.toml"))
            .expect("read systemd/config.toml");
    let config = write_config(&dir, "config.toml", &example);
    let credentials = dir.join("credentials");
    fs::create_dir(&credentials).expect("create the credentials dir");
    let key = shared_key();
    fs::write(credentials.join("private.pem"), &key.private_pem).expect("write the credential");
    chmod(&credentials.join("private.pem"), 0o400);
    let client = binary_for_others(&dir);

    let start = |config: &Path, socket: &Path| {
        let mut command = serve_config(&dir, config, socket);
        command.env("CREDENTIALS_DIRECTORY", &credentials);
        dir.start_at(command, socket)
    };
    let token = |groups: &[u32], socket: &Path| {
        run({
            let mut command = as_nobody(&dir, groups, &client);
            command.args(["token", "--socket", text(socket)]);
            command
        })
    };

    let socket = dir.join("agent.sock");
    let agent = start(&config, &socket);
    assert_eq!(mode(&socket), 0o660, "the example's socket_mode");
    assert_eq!(
        fs::symlink_metadata(&socket).unwrap().gid(),
        group.gid,
        "the example's socket_group"
    );
    let member = assert_success(&token(&[group.gid], &socket));
    verify(member.trim_end(), &key.public_pem, ISSUER, 3600);
    expect_audits(&agent, "default", NOBODY, "allow", 1);
    let outsider = token(&[], &socket);
    assert_exit(&outsider, 3, &["permission denied"]);
    assert!(outsider.stdout.is_empty());

    // With the socket open to all, the policy alone keeps non-members out.
    let open_example = example.replace("socket_mode = \"0660\"", "socket_mode = \"0666\"");
    assert_ne!(
        open_example, example,
        "the example sets socket_mode = \"0660\""
    );
    let open_config = write_config(&dir, "open.toml", &open_example);
    let open_socket = dir.join("open.sock");
    let open_agent = start(&open_config, &open_socket);
    assert_eq!(mode(&open_socket), 0o666);
    let outsider = token(&[], &open_socket);
    assert_exit(&outsider, 4, &["uid 65534", "identity \"default\""]);
    assert!(outsider.stdout.is_empty());
    expect_audits(&open_agent, "default", NOBODY, "deny", 1);
    let member = assert_success(&token(&[group.gid], &open_socket));
    verify(member.trim_end(), &key.public_pem, ISSUER, 3600);
}

// ---------------------------------------------------------------------------
// 4. An agent run as an unprivileged user is non-dumpable.
// ---------------------------------------------------------------------------

/// Starts `serve --key KEY` as uid 65534 on `run/agent.sock`, with the key
/// owned by 65534 and of mode 0600. `wrap` may put a command (`prlimit`)
/// in front of `setpriv`.
fn serve_as_nobody<'d>(dir: &'d Dir, extra: &[&str], wrap: Option<&[&str]>) -> Agent<'d> {
    start_as_nobody(dir, extra, wrap, |command| {
        dir.start_at(command, &dir.join("run/agent.sock"))
    })
}

/// Like [`serve_as_nobody`] but runs the agent to completion.
fn run_as_nobody(dir: &Dir, extra: &[&str], wrap: Option<&[&str]>) -> Output {
    start_as_nobody(dir, extra, wrap, run)
}

fn start_as_nobody<T>(
    dir: &Dir,
    extra: &[&str],
    wrap: Option<&[&str]>,
    start: impl FnOnce(Command) -> T,
) -> T {
    open_to_others(dir);
    let key = shared_key().write(dir, "private.pem");
    std::os::unix::fs::chown(&key, Some(NOBODY), Some(NOBODY)).expect("chown the key to 65534");
    let run_dir = dir.join("run");
    fs::create_dir_all(&run_dir).expect("create run/");
    std::os::unix::fs::chown(&run_dir, Some(NOBODY), Some(NOBODY)).expect("chown run/");
    let setpriv = as_nobody(dir, &[], &binary_for_others(dir));
    let mut command = match wrap {
        None => setpriv,
        Some(wrapper) => {
            let mut command = Command::new(wrapper[0]);
            scrub(&mut command, dir.path());
            command
                .args(&wrapper[1..])
                .arg(setpriv.get_program())
                .args(setpriv.get_args());
            command
        }
    };
    command
        .args(["serve", "--socket", text(&run_dir.join("agent.sock"))])
        .args(["--key", text(&key), "--issuer", ISSUER])
        .args(extra);
    start(command)
}

#[test]
fn agent_run_as_another_user_is_non_dumpable_and_has_no_core_limit() {
    require_root("run the agent as uid 65534");
    let dir = Dir::new();
    let agent = serve_as_nobody(&dir, &[], None);
    let pid = agent_pid(agent.socket());
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    assert!(
        status.lines().any(|line| line
            .split_whitespace()
            .eq(["Uid:", "65534", "65534", "65534", "65534"])),
        "the agent runs as uid 65534:\n{status}"
    );
    for file in ["mem", "environ"] {
        let path = format!("/proc/{pid}/{file}");
        let owner = fs::metadata(&path)
            .unwrap_or_else(|error| panic!("stat {path}: {error}"))
            .uid();
        assert_eq!(
            owner, 0,
            "{path} is owned by root (the agent is non-dumpable)"
        );
    }

    // A process of the same uid cannot read them...
    let cat = |path: &str| {
        let mut command = as_nobody(&dir, &[], Path::new("cat"));
        command.arg(path);
        run(command)
    };
    for file in ["environ", "mem"] {
        let output = cat(&format!("/proc/{pid}/{file}"));
        assert_exit(&output, 1, &["Permission denied"]);
    }
    // ...though it can read those of a dumpable process of that uid.
    let mut dumpable = as_nobody(&dir, &[], Path::new("cat"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn cat as 65534");
    // setpriv is non-dumpable from its change of uid until it executes cat.
    let environ_path = format!("/proc/{}/environ", dumpable.id());
    let deadline = Instant::now() + DEADLINE;
    while fs::metadata(&environ_path).map(|meta| meta.uid()).ok() != Some(NOBODY) {
        assert!(
            Instant::now() < deadline,
            "{environ_path} never became uid 65534's"
        );
        thread::sleep(POLL);
    }
    let environ = cat(&environ_path);
    drop(dumpable.stdin.take());
    let _ = dumpable.wait();
    assert_exit(&environ, 0, &[]);
    assert!(
        String::from_utf8_lossy(&environ.stdout).contains("HOME="),
        "the control's environ was read"
    );

    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    let core = limits
        .lines()
        .find(|line| line.starts_with("Max core file size"))
        .unwrap_or_else(|| panic!("no core line in\n{limits}"));
    assert_eq!(
        core.split_whitespace().collect::<Vec<_>>(),
        ["Max", "core", "file", "size", "0", "0", "bytes"],
        "RLIMIT_CORE is 0"
    );

    let report = assert_success(&dir.run(&["status", "--socket", text(agent.socket())]));
    assert!(
        report
            .lines()
            .any(|line| line.starts_with("key protection: protected")),
        "status reports the key as protected:\n{report}"
    );
    let protection = Rpc::connect(agent.socket())
        .status()
        .key_protection
        .expect("GetStatus reports key protection");
    assert_eq!(protection.state, "protected");
    assert!(
        protection.non_dumpable && protection.core_limit_zero,
        "{protection:?}"
    );
    assert_eq!(protection.lock_failures, 0, "{protection:?}");
}

#[test]
fn agent_run_as_another_user_keeps_key_memory_locked() {
    require_root("run the agent as uid 65534");
    let dir = Dir::new();
    let agent = serve_as_nobody(&dir, &[], None);
    let rpc = Rpc::connect(agent.socket());
    check_response(&rpc.token_with("", None), shared_key(), "default", 3600);
    let pid = agent_pid(agent.socket());
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let locked_kb: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmLck:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmLck in\n{status}"));
    let protection = rpc.status().key_protection.expect("key protection");
    assert!(
        locked_kb > 0,
        "VmLck of the serving agent is {locked_kb} kB: no key memory is locked while the key is loaded (GetStatus: {protection:?})"
    );
    assert!(
        protection.locked_bytes > 0,
        "GetStatus locked_bytes: {protection:?}"
    );
}

#[test]
fn status_prints_every_protection_measure() {
    let dir = Dir::new();
    let key = shared_key().write(&dir, "private.pem");
    let agent = dir.serve(&key);
    let report = assert_success(&dir.run(&["status", "--socket", text(agent.socket())]));
    let line = report
        .lines()
        .find(|line| line.starts_with("key protection: "))
        .unwrap_or_else(|| panic!("no key protection line in\n{report}"));
    for measure in [
        "protected",
        "non-dumpable: true",
        "core limit 0: true",
        "locked key bytes: ",
        "lock failures: 0",
    ] {
        assert!(
            line.contains(measure),
            "`status` does not report {measure:?} (the issue: the protection state, non-dumpable, locked bytes and core limit, is reported by `skykit-agent status`):\n{report}"
        );
    }
}

// ---------------------------------------------------------------------------
// 5. Memory scan: key bytes only in locked pages, nothing left after.
// ---------------------------------------------------------------------------

#[test]
fn key_bytes_stay_in_locked_pages_and_vanish_after_rotation() {
    require_root("read the agent's memory");
    let dir = Dir::new();
    let (old, new) = (fresh_key(), shared_key());
    let pieces = KeyPieces::of(old);
    let path = old.write(&dir, "private.pem");
    let agent = dir.serve(&path);
    let rpc = Rpc::connect(agent.socket());
    check_response(&rpc.token_with("", None), old, "default", 3600);
    check_response(&rpc.token_with("", Some(600)), old, "default", 600);
    let pid = agent_pid(agent.socket());

    let loaded = scan(pid, &pieces.patterns());
    let described = loaded.describe(&PATTERN_NAMES);
    assert_raw_forms_locked(&loaded, "the key loaded at start");
    let der = dir.write("control.der", pkcs8_der(old));
    let control = Control::start(&der);
    let baseline = scan(control.pid(), &pieces.patterns());
    drop(control);
    let baseline_described = baseline.describe(&PATTERN_NAMES);
    for pattern in PARSED {
        let name = PATTERN_NAMES[pattern];
        assert!(
            baseline.count(pattern) > 0,
            "the control process shows no {name} piece, so the scan cannot see a parsed key:\n{baseline_described}",
        );
        assert!(
            loaded.count(pattern) <= baseline.count(pattern),
            "the agent holds the {name} piece more often than the crypto library's parsed key alone\n--- agent ---\n{described}\n--- control ---\n{baseline_described}",
        );
    }
    // The scan of the agent sees its parsed key, so zero later means gone.
    assert!(loaded.sees_parsed_key(), "{described}");

    new.write(&dir, "private.pem");
    agent.signal(Signal::HUP);
    check_response(
        &wait_for_key_id(&agent, &rpc, "", &new.key_id),
        new,
        "default",
        3600,
    );
    check_response(&rpc.token_with("", Some(900)), new, "default", 900);
    let rotated = scan(pid, &pieces.patterns());
    assert_no_trace(&rotated, "after SIGHUP with a new key");
    // The new key was read on another thread (and malloc arena) than the
    // first one, so a heap copy freed there is less likely to be reused.
    let current = scan(pid, &KeyPieces::of(new).patterns());
    assert!(
        current.sees_parsed_key(),
        "the new key's parsed primes are not visible:\n{}",
        current.describe(&PATTERN_NAMES)
    );
    assert_raw_forms_locked(&current, "the key loaded by SIGHUP");
}

#[test]
fn key_bytes_vanish_when_reload_removes_the_identity() {
    require_root("read the agent's memory");
    let dir = Dir::new();
    let (kept, removed) = (shared_key(), fresh_key());
    let pieces = KeyPieces::of(removed);
    let kept_path = kept.write(&dir, "kept.pem");
    let removed_path = removed.write(&dir, "removed.pem");
    let both = [
        identity("kept", ISSUER, &kept_path, "default = true\n"),
        identity("gone", ISSUER, &removed_path, ""),
    ]
    .concat();
    let config = write_config(&dir, "config.toml", &both);
    let agent = dir.start(serve_config(&dir, &config, &dir.socket()));
    let rpc = Rpc::connect(agent.socket());
    check_response(&rpc.token_with("gone", None), removed, "gone", 3600);
    check_response(&rpc.token_with("kept", None), kept, "kept", 3600);
    let pid = agent_pid(agent.socket());
    let loaded = scan(pid, &pieces.patterns());
    assert!(
        loaded.sees_parsed_key(),
        "the scan does not see the loaded key:\n{}",
        loaded.describe(&PATTERN_NAMES)
    );
    assert_raw_forms_locked(&loaded, "the second key loaded at start");

    write_config(
        &dir,
        "config.toml",
        &identity("kept", ISSUER, &kept_path, ""),
    );
    agent.signal(Signal::HUP);
    let deadline = Instant::now() + DEADLINE;
    loop {
        match rpc.token("gone") {
            Err(status) if status.code() == tonic::Code::NotFound => break,
            other => assert!(
                Instant::now() < deadline,
                "identity `gone` still served {DEADLINE:?} after SIGHUP: {other:?}\n--- agent stderr ---\n{}",
                agent.stderr()
            ),
        }
        thread::sleep(POLL);
    }
    check_response(&rpc.token_with("kept", Some(600)), kept, "kept", 600);
    let after = scan(pid, &pieces.patterns());
    assert_no_trace(&after, "after SIGHUP removed the identity");
}

// ---------------------------------------------------------------------------
// 6. require_locked_memory.
// ---------------------------------------------------------------------------

#[test]
fn without_lockable_memory_the_agent_refuses_or_runs_degraded_as_configured() {
    require_root("run the agent as uid 65534 under prlimit");
    require_tool("prlimit", "apt-get install util-linux");
    let memlock = ["prlimit", "--memlock=0:0", "--"];

    let dir = Dir::new();
    let config = dir.write_mode("locked.toml", "require_locked_memory = true\n", 0o644);
    let refused = run_as_nobody(&dir, &["--config", text(&config)], Some(&memlock));
    assert_exit(
        &refused,
        EXIT_CONFIG,
        &["require_locked_memory = true", "LimitMEMLOCK", "ulimit -l"],
    );
    assert!(
        !dir.join("run/agent.sock").exists(),
        "a refused agent leaves no socket"
    );

    let dir = Dir::new();
    let agent = serve_as_nobody(&dir, &[], Some(&memlock));
    let limits = fs::read_to_string(format!("/proc/{}/limits", agent_pid(agent.socket())))
        .expect("read limits");
    assert!(
        limits
            .lines()
            .any(|line| line.starts_with("Max locked memory")
                && line.split_whitespace().skip(3).take(2).eq(["0", "0"])),
        "the agent runs with RLIMIT_MEMLOCK 0:\n{limits}"
    );
    let stderr = agent.stderr();
    assert!(
        stderr.contains("WARN") && stderr.contains("key memory could not be locked"),
        "no warning that key memory is not locked:\n{stderr}"
    );
    let rpc = Rpc::connect(agent.socket());
    check_response(&rpc.token_with("", None), shared_key(), "default", 3600);
    let report = assert_success(&dir.run(&["status", "--socket", text(agent.socket())]));
    assert!(
        report
            .lines()
            .any(|line| line.starts_with("key protection: degraded")),
        "status reports the key protection as degraded:\n{report}"
    );
    let protection = rpc.status().key_protection.expect("key protection");
    assert_eq!(protection.state, "degraded");
    assert!(protection.lock_failures > 0, "{protection:?}");
    assert!(
        protection.non_dumpable && protection.core_limit_zero,
        "{protection:?}"
    );
}

// ---------------------------------------------------------------------------
// 7. Logs at trace level hold no token and no key bytes.
// ---------------------------------------------------------------------------

#[test]
fn trace_logs_hold_no_token_and_no_key_bytes() {
    let dir = Dir::new();
    let (first, second) = (fresh_key(), shared_key());
    let path = first.write(&dir, "private.pem");
    let mut agent = dir.start(dir.serve_command(&path, &["--log-level", "trace"]));
    let rpc = Rpc::connect(agent.socket());
    let mut tokens = Vec::new();
    for lifetime in [None, None, Some(600), Some(600), Some(120)] {
        let response = rpc.token_with("", lifetime);
        check_response(
            &response,
            first,
            "default",
            lifetime.map_or(3600, |secs| secs as u64),
        );
        tokens.push(response.token);
    }
    assert_eq!(
        tokens[0], tokens[1],
        "the second call is served from the cache"
    );
    let status = rpc.status();
    assert_eq!(status.cache_entries.len(), 3, "{status:?}");

    second.write(&dir, "private.pem");
    agent.signal(Signal::HUP);
    tokens.push(wait_for_key_id(&agent, &rpc, "", &second.key_id).token);
    for lifetime in [None, Some(300)] {
        let response = rpc.token_with("", lifetime);
        check_response(
            &response,
            second,
            "default",
            lifetime.map_or(3600, |secs| secs as u64),
        );
        tokens.push(response.token);
    }
    drop(rpc);
    agent.signal(Signal::TERM);
    let exit = agent.wait();
    assert!(exit.success(), "the agent exits 0 on SIGTERM: {exit}");
    let log = agent.stderr();
    for needle in [
        " TRACE ",
        "signed new token",
        "SIGHUP",
        "reloaded",
        "stopped",
    ] {
        assert!(
            log.contains(needle),
            "the trace log lacks {needle:?}:\n{log}"
        );
    }

    let mut secrets: Vec<(String, String)> = Vec::new();
    for token in &tokens {
        secrets.push(("a token".to_owned(), token.clone()));
        let signature = token.rsplit('.').next().expect("a signature segment");
        secrets.push(("a token's signature".to_owned(), signature.to_owned()));
    }
    for (name, key) in [("first", first), ("second", second)] {
        for line in pem_lines(&key.private_pem) {
            secrets.push((format!("a PEM line of the {name} key"), line.to_owned()));
        }
        let pieces = KeyPieces::of(key);
        let primes = pieces.big_endian.iter().chain(&pieces.little_endian);
        for (index, piece) in primes.enumerate() {
            let what = format!("{} of the {name} key", PATTERN_NAMES[index]);
            let hex: String = piece.iter().map(|byte| format!("{byte:02x}")).collect();
            secrets.push((format!("{what} in hex"), hex.clone()));
            secrets.push((format!("{what} in HEX"), hex.to_uppercase()));
            let decimal = format!("{:?}", &piece[..16]);
            secrets.push((
                format!("{what} as a byte list"),
                decimal.trim_end_matches(']').to_owned(),
            ));
            // A base64 rendering of any buffer holding the piece has one of
            // three alignments; 30 aligned bytes give 40 fixed characters.
            for skip in 0..3 {
                let aligned = &piece[skip..skip + 30];
                for engine in [&STANDARD, &URL_SAFE] {
                    secrets.push((format!("{what} in base64"), engine.encode(aligned)));
                }
            }
        }
    }
    let leaked: Vec<&str> = secrets
        .iter()
        .filter(|(_, secret)| log.contains(secret.as_str()))
        .map(|(name, _)| name.as_str())
        .collect();
    assert!(
        leaked.is_empty(),
        "the trace log holds {leaked:?}\n--- log ---\n{log}"
    );
}

#[test]
fn finder_counts_every_occurrence_once_at_any_offset() {
    let pattern: [u8; PIECE] = std::array::from_fn(|index| index as u8 * 7 + 1);
    let other: [u8; PIECE] = std::array::from_fn(|index| 255 - index as u8);
    let finder = Finder::new(&[pattern, other]);
    let mut bytes = vec![0u8; 4096];
    // Every offset modulo 8, including both ends of the buffer.
    let starts = [0, 33, 74, 123, 164, 205, 246, 287, 400, 4096 - PIECE];
    for &start in &starts {
        bytes[start..start + PIECE].copy_from_slice(&pattern);
    }
    bytes[1000..1000 + PIECE].copy_from_slice(&other);
    let mut found = Vec::new();
    finder.find(&bytes, |index, offset| found.push((index, offset)));
    let mut expected: Vec<(usize, usize)> = starts.iter().map(|&start| (0, start)).collect();
    expected.insert(starts.len() - 1, (1, 1000));
    assert_eq!(found, expected);
}
