//! Sink tests: the atomic replace on real files in a temp dir, the retry
//! schedule, the file formats, and a sink task fed by a cache whose signer
//! makes fake tokens.

use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    sync::atomic::{AtomicUsize, Ordering},
};

use super::*;
use crate::{
    cache::{SignFailure, SystemClock},
    token::{Lifetime, Token},
};

/// Signs fake tokens named by a call counter: `fake.1`, `fake.2`, ...
#[derive(Default)]
struct FakeSigner {
    calls: AtomicUsize,
}

impl Signer for FakeSigner {
    fn sign(&self, _: &str, lifetime: Lifetime, issued_at: u64) -> Result<Token, SignFailure> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(Token {
            jws: format!("fake.{call}").into(),
            issuer: "test@example.com".into(),
            issued_at,
            expires_at: issued_at + u64::from(lifetime.secs()),
            key_id: "test-key".into(),
        })
    }
}

const OWNER_ONLY: Access = Access {
    mode: 0o600,
    owner: None,
    group: None,
};

fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("create a temp dir")
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("list the dir")
        .map(|entry| {
            entry
                .expect("a dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

#[test]
fn replace_writes_a_new_file_with_the_exact_mode() {
    let dir = temp_dir();
    let path = dir.path().join("token");
    // 0664 would lose its group-write bit to a umask of 022 or 077.
    let access = Access {
        mode: 0o664,
        ..OWNER_ONLY
    };
    replace(&path, b"one\n", access).unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap(), "one\n");
    let metadata = fs::metadata(&path).unwrap();
    assert_eq!(metadata.permissions().mode() & 0o7777, 0o664);
    assert_eq!(metadata.uid(), rustix::process::geteuid().as_raw());
    assert_eq!(names(dir.path()), ["token"], "no temporary file is left");
}

#[test]
fn replace_swaps_in_a_new_inode() {
    let dir = temp_dir();
    let path = dir.path().join("token");
    replace(&path, b"one\n", OWNER_ONLY).unwrap();
    let before = fs::metadata(&path).unwrap().ino();
    let reader = File::open(&path).unwrap();
    replace(&path, b"two\n", OWNER_ONLY).unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap(), "two\n");
    assert_ne!(
        fs::metadata(&path).unwrap().ino(),
        before,
        "renamed, not rewritten in place"
    );
    // A reader that opened the old file keeps reading it whole.
    assert_eq!(io::read_to_string(reader).unwrap(), "one\n");
    assert_eq!(names(dir.path()), ["token"]);
}

#[test]
fn replace_in_a_missing_folder_names_it() {
    let dir = temp_dir();
    let folder = dir.path().join("missing");
    let error = replace(&folder.join("token"), b"one\n", OWNER_ONLY).unwrap_err();
    let message = error.to_string();
    assert!(
        message.starts_with(&format!(
            "cannot create a temporary file in {}: ",
            folder.display()
        )),
        "{message}"
    );
    assert_eq!(error.cause.kind(), io::ErrorKind::NotFound);
}

#[test]
fn replace_over_a_folder_fails_and_removes_its_temporary_file() {
    let dir = temp_dir();
    let path = dir.path().join("token");
    fs::create_dir(&path).unwrap();
    fs::write(path.join("inside"), "x").unwrap();
    let error = replace(&path, b"one\n", OWNER_ONLY).unwrap_err();
    assert!(
        error.to_string().starts_with(&format!(
            "cannot rename a temporary file over {}: ",
            path.display()
        )),
        "{error}"
    );
    assert_eq!(
        names(dir.path()),
        ["token"],
        "the temporary file is removed"
    );
}

#[test]
fn replace_refuses_a_bare_root() {
    let error = replace(Path::new("/"), b"one\n", OWNER_ONLY).unwrap_err();
    assert_eq!(error.to_string(), "cannot write /: not a file path");
}

#[test]
fn retries_double_from_one_second_to_a_minute() {
    let mut backoff = Backoff::default();
    assert_eq!(backoff.pending(), None);
    let delays: Vec<u64> = (0..9).map(|_| backoff.fail().as_secs()).collect();
    assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    assert_eq!(backoff.pending(), Some(MAX_RETRY_DELAY));
}

fn issued(jws: &str) -> Issued {
    Issued {
        token: Arc::new(Token {
            jws: jws.into(),
            issuer: "you@example.com".into(),
            issued_at: 1_700_000_000,
            expires_at: 1_700_003_600,
            key_id: "kid".into(),
        }),
        refresh_after: Duration::from_millis(1_700_001_800_250),
        fresh: false,
    }
}

fn sink(path: PathBuf, format: SinkFormat) -> Sink {
    Sink {
        path,
        key: cache::Key {
            identity: "default".into(),
            lifetime: Lifetime::MAX,
        },
        format,
        access: OWNER_ONLY,
    }
}

#[test]
fn token_format_is_the_token_and_a_newline() {
    let sink = sink(PathBuf::from("/t"), SinkFormat::Token);
    assert_eq!(sink.contents(&issued("a.b.c")), "a.b.c\n");
}

#[test]
fn json_format_is_what_token_json_prints() {
    let sink = sink(PathBuf::from("/t"), SinkFormat::Json);
    let expected = r#"{
  "token": "a.b.c",
  "issuedAt": "2023-11-14T22:13:20Z",
  "expiresAt": "2023-11-14T23:13:20Z",
  "refreshAfter": "2023-11-14T22:43:20.250Z",
  "issuer": "you@example.com",
  "identity": "default",
  "keyId": "kid"
}
"#;
    assert_eq!(sink.contents(&issued("a.b.c")), expected);
}

/// Polls (real time, within 10 s) until `check` holds.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_writes_the_token_and_each_replacement() {
    let dir = temp_dir();
    let path = dir.path().join("token");
    let cache = Cache::new(Arc::new(FakeSigner::default()), SystemClock);
    let tracker = Arc::new(Tracker::new(PathBuf::from("/sock")));
    tracker.set_sinks(vec![SinkReport::new(path.clone(), "default".into())]);
    let sink = sink(path.clone(), SinkFormat::Token);
    let key = sink.key.clone();
    let task = tokio::spawn(run(sink, cache.clone(), tracker.clone(), 0));

    eventually("the first token is written", || read(&path) == "fake.1\n").await;
    eventually("the report shows the write", || {
        tracker.sinks()[0].last_written.is_some()
    })
    .await;
    // A rotation re-signs the watched entry at once; the sink follows.
    cache.forget(&key.identity);
    eventually("the second token is written", || read(&path) == "fake.2\n").await;
    let report = &tracker.sinks()[0];
    assert_eq!((report.error.as_deref(), report.failures), (None, 0));
    assert_eq!(cache.watchers(), 1, "the sink watches its entry");
    task.abort();
    assert_eq!(names(dir.path()), ["token"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_sink_reports_and_recovers_when_its_folder_appears() {
    let dir = temp_dir();
    let folder = dir.path().join("later");
    let path = folder.join("token");
    let cache = Cache::new(Arc::new(FakeSigner::default()), SystemClock);
    let tracker = Arc::new(Tracker::new(PathBuf::from("/sock")));
    tracker.set_sinks(vec![SinkReport::new(path.clone(), "default".into())]);
    let task = tokio::spawn(run(
        sink(path.clone(), SinkFormat::Token),
        cache.clone(),
        tracker.clone(),
        0,
    ));

    eventually("the failure is reported", || {
        tracker.sinks()[0].is_failing()
    })
    .await;
    let report = tracker.sinks()[0].clone();
    assert!(
        report
            .error
            .as_deref()
            .is_some_and(|error| error.contains("No such file or directory")),
        "{report:?}"
    );
    assert!(
        report.failures >= 1 && report.last_written.is_none(),
        "{report:?}"
    );

    fs::create_dir(&folder).unwrap();
    eventually("the retry writes the token", || read(&path) == "fake.1\n").await;
    eventually("the report is healthy again", || {
        !tracker.sinks()[0].is_failing()
    })
    .await;
    assert_eq!(tracker.sinks()[0].failures, 0);
    task.abort();
}
