//! Token file sinks (`[[sink]]`), end to end with the real binary: the file
//! holds a valid token in both formats, with the configured mode, owner and
//! group; a reader reading in a loop never sees a partial or empty file
//! while SIGHUP key rotations replace it; a missing folder and a full disk
//! (a 16 KiB tmpfs in a private mount namespace) are reported by `status`
//! (exit 5), leave the previous token intact, disturb neither GetToken nor
//! another sink, and heal on their own. Also the systemd drop-in that makes
//! a sink folder writable.

use crate::support::TestGroup;
use std::{
    collections::HashSet,
    fs, io,
    io::Write as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rustix::process::Signal;

use crate::support::*;

/// How often the polling loops here look again.
const POLL: Duration = Duration::from_millis(10);
/// `skykit-agent status` exit code when the agent is unhealthy.
const EXIT_UNHEALTHY: i32 = 5;

/// Writes `config.toml`: one identity with `key`, then `sinks` (TOML).
fn write_config(dir: &Dir, key: &Path, sinks: &str) -> PathBuf {
    dir.write_mode(
        "config.toml",
        format!(
            "[[identity]]\nissuer = \"{ISSUER}\"\nkey = \"{}\"\n\n{sinks}",
            key.display()
        ),
        0o644,
    )
}

/// A `[[sink]]` section writing `path` with the extra `lines`.
fn sink(path: &Path, lines: &str) -> String {
    format!("[[sink]]\npath = \"{}\"\n{lines}\n", path.display())
}

/// `serve --socket <dir>/agent.sock --config CONFIG`.
fn serve_command(dir: &Dir, config: &Path) -> Command {
    let mut command = dir.command(&["serve", "--socket"]);
    command.arg(dir.socket()).arg("--config").arg(config);
    command
}

/// `skykit-agent status` against the test's agent.
fn status(dir: &Dir) -> Output {
    let mut command = dir.command(&["status", "--socket"]);
    command.arg(dir.socket());
    run(command)
}

/// Polls until `check` returns something, failing with the agent's log
/// after [`DEADLINE`].
fn wait_for<T>(what: &str, agent: &Agent<'_>, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {DEADLINE:?} waiting for {what}\n--- agent stderr ---\n{}",
            agent.stderr()
        );
        thread::sleep(POLL);
    }
}

/// The token a token-format sink holds: one line, the token and a newline.
/// `None` while the file does not exist.
fn sink_token(path: &Path) -> Option<String> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return None,
        Err(error) => panic!("cannot read {}: {error}", path.display()),
    };
    let token = text
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("{} does not end in a newline: {text:?}", path.display()));
    assert!(
        !token.is_empty() && !token.contains('\n'),
        "{} must hold exactly one token line: {text:?}",
        path.display()
    );
    Some(token.to_owned())
}

/// Checks signatures without the agent's code and without panicking, for
/// loops that accept either of two keys.
struct Verifier {
    keys: Vec<DecodingKey>,
    validation: Validation,
}

impl Verifier {
    fn new(keys: &[&TestKey]) -> Self {
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["iss", "iat", "exp"]);
        Verifier {
            keys: keys
                .iter()
                .map(|key| DecodingKey::from_rsa_pem(key.public_pem.as_bytes()).expect("a PEM"))
                .collect(),
            validation,
        }
    }

    /// The index of the key `token` verifies with, if any.
    fn key_of(&self, token: &str) -> Option<usize> {
        self.keys.iter().position(|key| {
            jsonwebtoken::decode::<serde_json::Value>(token, key, &self.validation).is_ok()
        })
    }
}

/// Writes `key` over the identity's key file and sends SIGHUP.
fn rotate(dir: &Dir, agent: &Agent<'_>, key: &TestKey) {
    key.write(dir, "private.pem");
    agent.signal(Signal::HUP);
}

/// The entries of `folder` whose names look like the agent's temporary
/// files (`.NAME.RANDOM.tmp`).
fn temp_files(folder: &Path) -> Vec<String> {
    fs::read_dir(folder)
        .unwrap_or_else(|error| panic!("cannot list {}: {error}", folder.display()))
        .map(|entry| {
            entry
                .expect("a dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.starts_with('.') && name.ends_with(".tmp"))
        .collect()
}

/// Asserts that no temporary file stays in `folder`. A write attempt in
/// progress may hold one for an instant, so a few listings are taken: a
/// leaked file would show in all of them.
fn assert_no_temp_files_left(folder: &Path) {
    let mut last = Vec::new();
    for _ in 0..50 {
        last = temp_files(folder);
        if last.is_empty() {
            return;
        }
        thread::sleep(POLL);
    }
    panic!("temporary files left in {}: {last:?}", folder.display());
}

#[test]
fn sink_files_hold_a_valid_token_in_both_formats_with_their_modes() {
    let dir = Dir::new();
    let key = shared_key();
    let key_path = key.write(&dir, "private.pem");
    let (token_path, json_path) = (dir.join("token"), dir.join("token.json"));
    let config = write_config(
        &dir,
        &key_path,
        &format!(
            "{}{}",
            sink(&token_path, ""),
            sink(&json_path, "format = \"json\"\nmode = \"0600\"")
        ),
    );
    let agent = dir.start(serve_command(&dir, &config));

    let token = wait_for("the token sink", &agent, || sink_token(&token_path));
    verify(&token, &key.public_pem, ISSUER, 3600);
    assert_eq!(mode(&token_path), 0o640, "the default mode");
    assert_eq!(mode(&json_path), 0o600, "the configured mode");

    // The JSON sink holds exactly what `token --json` prints for the same
    // identity and lifetime (the same cache entry, so the same token).
    let json = wait_for("the JSON sink", &agent, || {
        fs::read_to_string(&json_path).ok()
    });
    let printed = assert_success(&dir.token(&["--json"]));
    eqnice(&printed, &json, "the JSON sink against `token --json`");
    let parsed: serde_json::Value = serde_json::from_str(&json).expect("the JSON sink parses");
    assert_eq!(parsed["token"], token.as_str());
    assert_eq!(parsed["keyId"], key.key_id.as_str());
    assert_eq!(parsed["identity"], "default");
    let claims = verify(&token, &key.public_pem, ISSUER, 3600);
    assert_eq!(parsed["issuedAt"], rfc3339(claims.iat).as_str());
    assert_eq!(parsed["expiresAt"], rfc3339(claims.exp).as_str());

    let report = assert_success(&status(&dir));
    for path in [&token_path, &json_path] {
        let prefix = format!("  {} (default): ok, written ", path.display());
        assert!(
            report.lines().any(|line| line.starts_with(&prefix)),
            "no line starting {prefix:?} in the status:\n{report}"
        );
    }
    // Both sinks watch one entry, which a refresher re-signs at refresh_after.
    assert!(
        report.contains("sinks: 2") && report.contains("watchers: 2 (refresher tasks: 1)"),
        "{report}"
    );
    assert!(
        !agent.stderr().contains(&token),
        "the agent's log contains the token"
    );
}

#[test]
fn sink_file_gets_the_configured_owner_and_group() {
    require_root("give a sink file to another user and group");
    let group = TestGroup::create("skykit-sink");
    let dir = Dir::new();
    let key = shared_key();
    let key_path = key.write(&dir, "private.pem");
    let path = dir.join("token");
    let config = write_config(
        &dir,
        &key_path,
        &sink(
            &path,
            &format!(
                "owner = \"{NOBODY}\"\ngroup = \"{}\"\nmode = \"0440\"",
                group.name
            ),
        ),
    );
    let agent = dir.start(serve_command(&dir, &config));
    let token = wait_for("the sink", &agent, || sink_token(&path));
    verify(&token, &key.public_pem, ISSUER, 3600);
    let metadata = fs::metadata(&path).expect("stat the sink");
    assert_eq!(
        (metadata.uid(), metadata.gid(), mode(&path)),
        (NOBODY, group.gid, 0o440),
        "owner, group and mode of the sink file"
    );

    // A replacement keeps them.
    rotate(&dir, &agent, &pkcs1_key());
    let verifier = Verifier::new(&[&pkcs1_key()]);
    wait_for("the rotated token", &agent, || {
        sink_token(&path).filter(|token| verifier.key_of(token).is_some())
    });
    let metadata = fs::metadata(&path).expect("stat the sink");
    assert_eq!(
        (metadata.uid(), metadata.gid(), mode(&path)),
        (NOBODY, group.gid, 0o440)
    );
    assert_no_temp_files_left(dir.path());
}

#[test]
fn a_reader_never_sees_a_partial_or_empty_sink_across_rotations() {
    const ROTATIONS: usize = 8;
    let dir = Dir::new();
    let keys = [shared_key().clone(), pkcs1_key()];
    let key_path = keys[0].write(&dir, "private.pem");
    let path = dir.join("token");
    let config = write_config(&dir, &key_path, &sink(&path, ""));
    let agent = dir.start(serve_command(&dir, &config));
    let verifier = Arc::new(Verifier::new(&[&keys[0], &keys[1]]));
    wait_for("the first token", &agent, || {
        sink_token(&path).filter(|token| verifier.key_of(token) == Some(0))
    });

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (stop, reads, verifier, path) =
            (stop.clone(), reads.clone(), verifier.clone(), path.clone());
        thread::spawn(move || {
            let mut seen = HashSet::new();
            while !stop.load(Ordering::SeqCst) {
                let bytes = fs::read(&path).expect("the sink file always exists");
                let text = String::from_utf8(bytes).expect("the sink is UTF-8");
                let read = reads.load(Ordering::SeqCst);
                let token = text
                    .strip_suffix('\n')
                    .filter(|token| !token.is_empty() && !token.contains('\n'))
                    .unwrap_or_else(|| panic!("read {read}: a partial or empty sink: {text:?}"));
                assert!(
                    verifier.key_of(token).is_some(),
                    "read {read}: the sink holds a token that verifies with neither key: {token:?}"
                );
                seen.insert(token.to_owned());
                reads.fetch_add(1, Ordering::SeqCst);
            }
            seen.len()
        })
    };
    for rotation in 1..=ROTATIONS {
        let next = rotation % 2;
        rotate(&dir, &agent, &keys[next]);
        wait_for(&format!("rotation {rotation} in the sink"), &agent, || {
            sink_token(&path).filter(|token| verifier.key_of(token) == Some(next))
        });
        // Let the reader read the new token (two reads: the second began
        // after it was in place) before the next rotation replaces it.
        let before = reads.load(Ordering::SeqCst);
        wait_for("the reader to read on", &agent, || {
            (reads.load(Ordering::SeqCst) >= before + 2 || reader.is_finished()).then_some(())
        });
        if reader.is_finished() {
            break;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let distinct = match reader.join() {
        Ok(distinct) => distinct,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    let reads = reads.load(Ordering::SeqCst);
    assert!(
        distinct >= 2 && reads >= 2 * ROTATIONS,
        "the reader saw {distinct} distinct tokens in {reads} reads"
    );
    assert_no_temp_files_left(dir.path());
}

#[test]
fn a_sink_whose_folder_is_missing_fails_alone_and_recovers_when_it_appears() {
    let dir = Dir::new();
    let key = shared_key();
    let key_path = key.write(&dir, "private.pem");
    let folder = dir.join("later");
    let (missing, healthy) = (folder.join("token"), dir.join("healthy"));
    let config = write_config(
        &dir,
        &key_path,
        &format!("{}{}", sink(&missing, ""), sink(&healthy, "")),
    );
    let agent = dir.start(serve_command(&dir, &config));

    // The agent serves, the other sink is written, and status reports the
    // failing one with exit 5.
    let token = wait_for("the healthy sink", &agent, || sink_token(&healthy));
    verify(&token, &key.public_pem, ISSUER, 3600);
    let mut grpc = agent.grpc();
    check_response(&grpc.ok(request("", None, None)), key, "default", 3600);
    let output = wait_for("status to report the failing sink", &agent, || {
        let output = status(&dir);
        (output.status.code() == Some(EXIT_UNHEALTHY)).then_some(output)
    });
    let report = String::from_utf8_lossy(&output.stdout);
    let failing = format!("  {} (default): FAILING (", missing.display());
    assert!(
        report.lines().any(|line| line.starts_with(&failing)
            && line.contains("never written")
            && line.contains("No such file or directory")),
        "no line starting {failing:?} naming the error in:\n{report}"
    );
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("token file sink failing"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let log = agent.stderr();
    assert!(
        log.lines()
            .any(|line| line.contains("cannot write the token file")
                && line.contains(&missing.display().to_string())
                && line.contains("No such file or directory")),
        "no warning naming the path and the error in the log:\n{log}"
    );
    assert!(!log.contains(&token), "the agent's log contains the token");
    assert!(!folder.exists());

    fs::create_dir(&folder).expect("create the sink folder");
    let recovered = wait_for("the sink after its folder appeared", &agent, || {
        sink_token(&missing)
    });
    assert_eq!(recovered, token, "the same cached token");
    assert_eq!(mode(&missing), 0o640);
    wait_for("status to be healthy again", &agent, || {
        (status(&dir).status.code() == Some(0)).then_some(())
    });
    assert_no_temp_files_left(&folder);
}

#[test]
fn a_full_disk_keeps_the_previous_token_until_there_is_room() {
    require_root("mount a tmpfs in a private mount namespace");
    let dir = Dir::new();
    let (old, new) = (shared_key(), pkcs1_key());
    let verifier = Verifier::new(&[old, &new]);
    let key_path = old.write(&dir, "private.pem");
    let mountpoint = dir.join("tmpfs");
    fs::create_dir(&mountpoint).expect("create the mount point");
    check_private_tmpfs(&dir, &mountpoint);
    let (full, healthy) = (mountpoint.join("token"), dir.join("healthy"));
    let config = write_config(
        &dir,
        &key_path,
        &format!("{}{}", sink(&full, ""), sink(&healthy, "")),
    );
    let pidfile = dir.join("agent.pid");
    let mut command = Command::new("unshare");
    scrub(&mut command, dir.path());
    command
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(
            "echo $$ > \"$1\" && mount -t tmpfs -o size=16k,mode=0755 tmpfs \"$2\" && shift 2 && exec \"$@\"",
        )
        .arg("sh")
        .arg(&pidfile)
        .arg(&mountpoint)
        .arg(BIN)
        .args(["serve", "--socket"])
        .arg(dir.socket())
        .arg("--config")
        .arg(&config);
    let agent = dir.start(command);
    // The tmpfs exists only in the agent's mount namespace: reach it
    // through the agent's root.
    let pid = fs::read_to_string(&pidfile).expect("read the agent's pid");
    let inside = Path::new("/proc")
        .join(pid.trim())
        .join("root")
        .join(mountpoint.strip_prefix("/").expect("an absolute temp dir"));
    let sink_path = inside.join("token");
    assert!(
        sink_token(&full).is_none(),
        "outside the namespace the mount point must stay empty"
    );
    wait_for("the first token on the tmpfs", &agent, || {
        sink_token(&sink_path).filter(|token| verifier.key_of(token) == Some(0))
    });
    let before = sink_token(&sink_path).expect("the sink exists");

    let filler = inside.join("filler");
    fill(&filler);
    rotate(&dir, &agent, &new);
    // The healthy sink and GetToken move to the new key...
    wait_for("the new key in the healthy sink", &agent, || {
        sink_token(&healthy).filter(|token| verifier.key_of(token) == Some(1))
    });
    let mut grpc = agent.grpc();
    check_response(&grpc.ok(request("", None, None)), &new, "default", 3600);
    // ...while the full one keeps the old token, complete and valid, and
    // status names the error.
    let output = wait_for("status to report the full disk", &agent, || {
        let output = status(&dir);
        (output.status.code() == Some(EXIT_UNHEALTHY)).then_some(output)
    });
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        report
            .lines()
            .any(|line| line.contains(&full.display().to_string())
                && line.contains("FAILING")
                && line.contains("No space left on device")),
        "status does not name the full disk:\n{report}"
    );
    let kept = sink_token(&sink_path).expect("the old sink file stays");
    assert_eq!(kept, before, "the previous token is intact");
    verify(&kept, &old.public_pem, ISSUER, 3600);
    assert_no_temp_files_left(&inside);

    fs::remove_file(&filler).expect("remove the filler");
    let written = wait_for("the new token after room was made", &agent, || {
        sink_token(&sink_path).filter(|token| verifier.key_of(token) == Some(1))
    });
    verify(&written, &new.public_pem, ISSUER, 3600);
    wait_for("status to be healthy again", &agent, || {
        (status(&dir).status.code() == Some(0)).then_some(())
    });
    assert_no_temp_files_left(&inside);
}

/// Mounts a 16 KiB tmpfs on `mountpoint` in a throwaway private mount
/// namespace, or fails the test loudly: the full-disk test means nothing
/// without it.
fn check_private_tmpfs(dir: &Dir, mountpoint: &Path) {
    let mut command = Command::new("unshare");
    scrub(&mut command, dir.path());
    command
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg("mount -t tmpfs -o size=16k tmpfs \"$1\" && touch \"$1/probe\"")
        .arg("sh")
        .arg(mountpoint);
    let output = match command.output() {
        Ok(output) => output,
        Err(error) => panic!(
            "cannot run `unshare` ({error}); this test needs util-linux's unshare and mount, as root"
        ),
    };
    assert!(
        output.status.success(),
        "cannot mount a 16 KiB tmpfs inside `unshare -m` ({}): {}\nthis test needs root with CAP_SYS_ADMIN and util-linux's unshare and mount",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        fs::read_dir(mountpoint)
            .expect("list the mount point")
            .next()
            .is_none(),
        "the tmpfs leaked out of its private mount namespace"
    );
}

/// Writes `path` until the file system is full; it must end in ENOSPC.
fn fill(path: &Path) {
    let mut file = fs::File::create(path).expect("create the filler");
    let chunk = [0u8; 1024];
    for _ in 0..64 {
        match file.write_all(&chunk) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::StorageFull => return,
            Err(error) => panic!("cannot write the filler: {error}"),
        }
    }
    panic!("64 KiB fit in a 16 KiB tmpfs: {}", path.display());
}

// ---------------------------------------------------------------------------
// The systemd drop-in.
// ---------------------------------------------------------------------------

/// `systemd-analyze security`'s verdict for the unit with the drop-in, as
/// recorded in the drop-in and the README.
const RECORDED_EXPOSURE: f64 = 0.5;
/// The drop-in under test, in `systemd/skykit-agent.service.d/`.
const DROP_IN: &str = "sinks.conf";

#[test]
fn sinks_drop_in_verifies_without_output() {
    let dir = Dir::new();
    let (socket, service, drop_in) = units_with_drop_in(&dir, DROP_IN);
    let verify = |dir: &Dir| systemd_verify(dir, false, &[&socket, &service]);
    assert_silent_success(
        &verify(&dir),
        "systemd-analyze verify of the service with sinks.conf",
    );
    let settings = fs::read_to_string(&drop_in).expect("read the drop-in");
    assert!(
        settings
            .lines()
            .any(|line| line == "ReadWritePaths=/run/skykit-agent-sinks"),
        "the drop-in's ReadWritePaths= line:\n{settings}"
    );
    // The check is worth something only if verify reads the drop-in folder:
    // a bad line there must be reported.
    fs::write(
        drop_in.with_file_name("zz-bad.conf"),
        "[Service]\nNoSuchSetting=1\n",
    )
    .expect("write a bad drop-in");
    let output = verify(&dir);
    assert!(
        describe(&output).contains("NoSuchSetting"),
        "systemd-analyze verify ignored the drop-in folder:\n{}",
        describe(&output)
    );
}

#[test]
fn sinks_drop_in_keeps_the_recorded_exposure() {
    let dir = Dir::new();
    let (_, service, _) = units_with_drop_in(&dir, DROP_IN);
    let exposure = assert_exposure_at_most_1_0(&dir, &service, "with sinks.conf");
    assert_eq!(
        exposure, RECORDED_EXPOSURE,
        "the exposure with sinks.conf changed: update the drop-in and the README"
    );
}
