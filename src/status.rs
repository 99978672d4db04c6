//! What the agent reports about itself (`GetStatus`, `skykit-agent status`):
//! when it started, where it listens, open connections and the outcome of
//! the last reload.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, atomic::AtomicUsize},
    time::SystemTime,
};

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
    last_reload: Mutex<Option<Reload>>,
}

impl Tracker {
    pub fn new(socket: PathBuf) -> Self {
        Tracker {
            started_at: SystemTime::now(),
            socket,
            open_connections: Arc::new(AtomicUsize::new(0)),
            last_reload: Mutex::new(None),
        }
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
