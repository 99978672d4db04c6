//! What the agent reports about itself (`GetStatus`, `skykit-agent status`):
//! when it started, where it listens, open connections, the outcome of the
//! last reload and the state of each token file sink.

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::SystemTime,
};

/// A call in progress; see [`Tracker::call`].
pub struct CallGuard<'a>(&'a AtomicUsize);

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The outcome of one SIGHUP reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reload {
    pub finished_at: SystemTime,
    /// Why it failed; `None` when the new state was swapped in.
    pub error: Option<String>,
}

/// What `GetStatus` reports about one `[[sink]]` file; the sink's task
/// (`sink.rs`) keeps it current.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkReport {
    pub path: PathBuf,
    /// The identity's name, resolved: never empty.
    pub identity: String,
    /// When the file was last replaced successfully; `None` if never since
    /// the agent started.
    pub last_written: Option<SystemTime>,
    /// Why the last attempt failed; `None` after a success.
    pub error: Option<String>,
    /// Attempts that failed since the last success.
    pub failures: u32,
}

impl SinkReport {
    /// A sink nothing was attempted for yet.
    pub fn new(path: PathBuf, identity: String) -> Self {
        SinkReport {
            path,
            identity,
            last_written: None,
            error: None,
            failures: 0,
        }
    }

    /// Whether the file is not being kept current.
    pub fn is_failing(&self) -> bool {
        self.error.is_some()
    }
}

/// Live facts about the running agent, shared by the server and the reloader.
#[derive(Debug)]
pub struct Tracker {
    pub started_at: SystemTime,
    pub socket: PathBuf,
    /// Open client connections; the accept loop counts them.
    pub open_connections: Arc<AtomicUsize>,
    /// Calls being answered; each handler holds a [`CallGuard`].
    pub calls_in_progress: AtomicUsize,
    last_reload: Mutex<Option<Reload>>,
    /// One report per configured sink, in config order.
    sinks: Mutex<Vec<SinkReport>>,
}

impl Tracker {
    pub fn new(socket: PathBuf) -> Self {
        Tracker {
            started_at: SystemTime::now(),
            socket,
            open_connections: Arc::new(AtomicUsize::new(0)),
            calls_in_progress: AtomicUsize::new(0),
            last_reload: Mutex::new(None),
            sinks: Mutex::new(Vec::new()),
        }
    }

    /// Counts a call until the guard drops: when the handler returns, or
    /// when tonic drops it because the client reset the stream.
    pub fn call(&self) -> CallGuard<'_> {
        self.calls_in_progress.fetch_add(1, Ordering::Relaxed);
        CallGuard(&self.calls_in_progress)
    }

    pub fn record_reload(&self, reload: Reload) {
        *self
            .last_reload
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(reload);
    }

    pub fn last_reload(&self) -> Option<Reload> {
        self.last_reload
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Replaces the sink reports (once, when the sinks start).
    pub fn set_sinks(&self, reports: Vec<SinkReport>) {
        *self
            .sinks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = reports;
    }

    /// Updates the report of the sink at `index`, if there is one.
    pub fn update_sink(&self, index: usize, update: impl FnOnce(&mut SinkReport)) {
        if let Some(report) = self
            .sinks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get_mut(index)
        {
            update(report);
        }
    }

    pub fn sinks(&self) -> Vec<SinkReport> {
        self.sinks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}
