//! Token file sinks: for each `[[sink]]`, a task that keeps a file holding
//! the current token of one identity and lifetime, for programs that can
//! only read a file (the way Kubernetes projects service-account tokens).
//!
//! The task subscribes to the cache entry, so the cache re-signs it at
//! `refresh_after` and at once after a key rotation, and writes each token
//! it is given. Every write replaces the file atomically (a temporary file
//! in the same folder, written and synced, then renamed over it), so a
//! reader sees the old token or the new one, never a partial or empty file.
//! A write that fails is logged and retried with backoff, and at once when
//! a new token arrives; it never stops the agent or another sink. Each
//! sink's state is kept in the [`Tracker`] for `GetStatus`.

use std::{
    fs::{self, File, OpenOptions, Permissions},
    io::{self, Write as _},
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::task::JoinSet;

use crate::{
    cache::{self, Cache, Clock, Issued, Signer},
    config::{SinkConfig, SinkFormat},
    identity::Identities,
    peer::Peer,
    server,
    status::{SinkReport, Tracker},
};

/// The wait before the first retry of a failed write; each further failure
/// doubles it, up to [`MAX_RETRY_DELAY`].
pub const FIRST_RETRY_DELAY: Duration = Duration::from_secs(1);
/// The longest wait between two attempts at a failing sink.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);

/// The running sink tasks. [`Sinks::stop`] (or dropping it) ends them; a
/// write in progress still finishes or cleans up after itself, since it
/// runs on a blocking thread.
pub struct Sinks {
    tasks: JoinSet<()>,
}

impl Sinks {
    /// Stops every sink task. The files keep the last token written.
    pub fn stop(mut self) {
        self.tasks.abort_all();
    }
}

/// Why a sink file could not be replaced. The message names the step and
/// the file or folder; it never contains the token.
#[derive(Debug, thiserror::Error)]
#[error("cannot {step} {}: {cause}", path.display())]
pub struct WriteError {
    step: &'static str,
    path: PathBuf,
    cause: io::Error,
}

/// Who owns a sink file and what mode it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// The exact permission bits; the umask does not apply.
    pub mode: u32,
    /// `None`: the agent's user.
    pub owner: Option<u32>,
    /// `None`: the agent's group.
    pub group: Option<u32>,
}

/// Starts one task per sink (within the current tokio runtime), each
/// subscribed to the cache entry of its identity (empty: the default one)
/// and lifetime (unset: the identity's default). Their reports replace the
/// tracker's sink list. A sink whose identity does not exist (a config that
/// `config.rs` would have refused) gets no task and reports the error.
pub fn start<S: Signer, C: Clock>(
    configs: &[SinkConfig],
    identities: &Identities,
    cache: &Cache<S, C>,
    tracker: &Arc<Tracker>,
) -> Sinks {
    let mut reports = Vec::new();
    let mut sinks = Vec::new();
    for config in configs {
        match identities.resolve(&config.identity) {
            Some(identity) => {
                let key = cache::Key {
                    identity: identity.name.clone(),
                    lifetime: config.lifetime.unwrap_or(identity.lifetime),
                };
                reports.push(SinkReport::new(
                    config.path.clone(),
                    identity.name.to_string(),
                ));
                sinks.push((reports.len() - 1, Sink::new(config, key)));
            }
            None => {
                let error = format!("unknown identity {:?}", config.identity);
                tracing::error!(path = %config.path.display(), %error, "token file sink not started");
                let mut report = SinkReport::new(config.path.clone(), config.identity.clone());
                report.error = Some(error);
                reports.push(report);
            }
        }
    }
    tracker.set_sinks(reports);
    let mut tasks = JoinSet::new();
    for (index, sink) in sinks {
        tracing::info!(
            path = %sink.path.display(),
            identity = %sink.key.identity,
            lifetime_secs = sink.key.lifetime.secs(),
            "keeping a token file"
        );
        tasks.spawn(run(sink, cache.clone(), tracker.clone(), index));
    }
    Sinks { tasks }
}

/// One sink, resolved.
struct Sink {
    path: PathBuf,
    key: cache::Key,
    format: SinkFormat,
    access: Access,
}

impl Sink {
    fn new(config: &SinkConfig, key: cache::Key) -> Self {
        Sink {
            path: config.path.clone(),
            key,
            format: config.format,
            access: Access {
                mode: config.mode,
                owner: config.owner,
                group: config.group.as_ref().map(|group| group.gid),
            },
        }
    }

    /// What the file holds for `issued`.
    fn contents(&self, issued: &Issued) -> String {
        match self.format {
            SinkFormat::Token => format!("{}\n", issued.token.jws),
            SinkFormat::Json => format!("{}\n", server::issued_json(issued, &self.key.identity)),
        }
    }
}

/// Keeps one sink's file current until the task is aborted.
async fn run<S: Signer, C: Clock>(
    sink: Sink,
    cache: Cache<S, C>,
    tracker: Arc<Tracker>,
    index: usize,
) {
    let sink = Arc::new(sink);
    // The agent itself asks: signatures it triggers are logged as its own.
    let caller = Peer {
        uid: rustix::process::geteuid().as_raw(),
        gid: rustix::process::getegid().as_raw(),
        pid: Some(rustix::process::getpid().as_raw_nonzero().get()),
    };
    let mut retry = Backoff::default();
    loop {
        // Subscribe first, then read the current token: nothing signed in
        // between can be missed.
        let mut updates = cache.subscribe(&sink.key, caller);
        let mut latest: Option<Issued> = None;
        let mut written: Option<Arc<str>> = None;
        loop {
            if latest.is_none() {
                match cache.get(&sink.key, Duration::ZERO, caller).await {
                    Ok(issued) => latest = Some(issued),
                    Err(error) => {
                        let error = format!("no token to write: {error}");
                        record_failure(&sink, &tracker, index, &mut retry, error);
                    }
                }
            }
            if let Some(issued) = &latest
                && written.as_ref() != Some(&issued.token.jws)
            {
                match write(sink.clone(), issued).await {
                    Ok(()) => {
                        written = Some(issued.token.jws.clone());
                        retry = Backoff::default();
                        tracing::debug!(path = %sink.path.display(), exp = issued.token.expires_at, "wrote token file");
                        tracker.update_sink(index, |report| {
                            report.last_written = Some(SystemTime::now());
                            report.error = None;
                            report.failures = 0;
                        });
                    }
                    Err(error) => {
                        record_failure(&sink, &tracker, index, &mut retry, error.to_string());
                    }
                }
            }
            let wait = retry.pending();
            tokio::select! {
                changed = updates.changed() => {
                    if changed.is_err() {
                        // The entry's channel closed: subscribe again.
                        break;
                    }
                    if let Some(issued) = updates.borrow_and_update().clone() {
                        latest = Some(issued);
                    }
                }
                () = tokio::time::sleep(wait.unwrap_or_default()), if wait.is_some() => {}
            }
        }
        tokio::time::sleep(FIRST_RETRY_DELAY).await;
    }
}

fn record_failure(
    sink: &Sink,
    tracker: &Tracker,
    index: usize,
    retry: &mut Backoff,
    error: String,
) {
    let retry_in = retry.fail();
    crate::metrics::global()
        .sink_write_failures
        .get_or_create(&crate::metrics::SinkLabels {
            path: sink.path.display().to_string(),
        })
        .inc();
    tracing::warn!(
        path = %sink.path.display(),
        identity = %sink.key.identity,
        %error,
        retry_in_secs = retry_in.as_secs_f64(),
        "cannot write the token file; retrying (and at once when a new token is signed)"
    );
    tracker.update_sink(index, |report| {
        report.error = Some(error);
        report.failures = report.failures.saturating_add(1);
    });
}

/// The retry schedule of a failing sink: 1 s, then doubling to 60 s.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Backoff {
    /// The wait before the next attempt; `None` while the sink is healthy.
    next: Option<Duration>,
}

impl Backoff {
    /// Records a failure and returns how long to wait before retrying.
    fn fail(&mut self) -> Duration {
        let delay = match self.next {
            None => FIRST_RETRY_DELAY,
            Some(last) => (last * 2).min(MAX_RETRY_DELAY),
        };
        self.next = Some(delay);
        delay
    }

    fn pending(self) -> Option<Duration> {
        self.next
    }
}

/// Writes `issued` into the sink's file on a blocking thread (fsync can
/// take a while). The write completes even if the task is aborted meanwhile.
async fn write(sink: Arc<Sink>, issued: &Issued) -> Result<(), WriteError> {
    let contents = sink.contents(issued);
    let path = sink.path.clone();
    tokio::task::spawn_blocking(move || replace(&sink.path, contents.as_bytes(), sink.access))
        .await
        .unwrap_or_else(|_| {
            Err(WriteError {
                step: "write",
                path,
                cause: io::Error::other("the writing thread panicked"),
            })
        })
}

/// Replaces the file at `path` with `contents` atomically: a new temporary
/// file in the same folder gets owner, group and mode first, then the
/// contents, is synced and renamed over `path`; then the folder is synced.
/// Readers see either the old file or the complete new one. On failure the
/// temporary file is removed and `path` is untouched (unless only the final
/// folder sync failed).
///
/// # Errors
///
/// Any failing step, naming it and the file or folder: a missing folder, no
/// permission, a full disk, a `path` that is a folder.
pub fn replace(path: &Path, contents: &[u8], access: Access) -> Result<(), WriteError> {
    let fail = |step: &'static str, path: &Path| {
        let path = path.to_owned();
        move |cause| WriteError { step, path, cause }
    };
    let (Some(folder), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(fail("write", path)(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a file path",
        )));
    };
    let folder = if folder.as_os_str().is_empty() {
        Path::new(".")
    } else {
        folder
    };
    let (temp, file) = create_temp(folder, &name.to_string_lossy(), access.mode)
        .map_err(fail("create a temporary file in", folder))?;
    let written = fill(&file, &temp, contents, access)
        .and_then(|()| fs::rename(&temp, path).map_err(fail("rename a temporary file over", path)));
    drop(file);
    if let Err(error) = written {
        let _ = fs::remove_file(&temp);
        return Err(error);
    }
    File::open(folder)
        .and_then(|folder| folder.sync_all())
        .map_err(fail("sync the folder", folder))
}

/// Owner, group and exact mode, then the contents, synced to disk.
fn fill(file: &File, temp: &Path, contents: &[u8], access: Access) -> Result<(), WriteError> {
    let fail = |step: &'static str| {
        move |cause| WriteError {
            step,
            path: temp.to_owned(),
            cause,
        }
    };
    // chown only when it changes something: the system unit's system call
    // filter forbids chown altogether, even to the agent's own group.
    let metadata = file.metadata().map_err(fail("inspect"))?;
    let owner = access.owner.filter(|&uid| uid != metadata.uid());
    let group = access.group.filter(|&gid| gid != metadata.gid());
    if owner.is_some() || group.is_some() {
        std::os::unix::fs::fchown(file, owner, group)
            .map_err(fail("set the owner and group of"))?;
    }
    // After chown, which clears set-id bits, and regardless of the umask.
    file.set_permissions(Permissions::from_mode(access.mode))
        .map_err(fail("set the mode of"))?;
    let mut writer = file;
    writer.write_all(contents).map_err(fail("write"))?;
    file.sync_all().map_err(fail("sync"))
}

/// Creates `.NAME.RANDOM.tmp` in `folder`, new (`O_EXCL`, never following a
/// link), with only the owner bits of `mode`: until chown and chmod give it
/// its final access, no group or other user can open it.
fn create_temp(folder: &Path, name: &str, mode: u32) -> io::Result<(PathBuf, File)> {
    let mut attempts = 0;
    loop {
        let mut random = [0u8; 8];
        aws_lc_rs::rand::fill(&mut random).map_err(|_| io::Error::other("no random bytes"))?;
        let suffix: String = random.iter().map(|byte| format!("{byte:02x}")).collect();
        let temp = folder.join(format!(".{name}.{suffix}.tmp"));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode & 0o700)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&temp)
        {
            Ok(file) => return Ok((temp, file)),
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists && attempts < 8 => {
                attempts += 1;
            }
            Err(error) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests;
