//! What the agent reports about itself (`GetStatus`, `skykit-agent status`):
//! when it started, where it listens, open connections and the outcome of
//! the last reload.

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
}

impl Tracker {
    pub fn new(socket: PathBuf) -> Self {
        Tracker {
            started_at: SystemTime::now(),
            socket,
            open_connections: Arc::new(AtomicUsize::new(0)),
            calls_in_progress: AtomicUsize::new(0),
            last_reload: Mutex::new(None),
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
}
