//! The signals that stop the agent: SIGTERM (systemd, `kill`) and SIGINT
//! (Ctrl-C in a terminal).

use tokio::signal::unix::{Signal, SignalKind, signal};

/// Shutdown signals, registered when created so that a signal arriving
/// before the server runs is not lost to the default action (which would
/// kill the agent without removing its socket).
pub struct Shutdown {
    terminate: Signal,
    interrupt: Signal,
}

impl Shutdown {
    /// Registers the handlers; needs a tokio runtime.
    pub fn install() -> std::io::Result<Self> {
        Ok(Shutdown {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves when SIGTERM or SIGINT arrives.
    pub async fn wait(mut self) {
        tokio::select! {
            _ = self.terminate.recv() => tracing::info!(signal = "SIGTERM", "shutdown requested"),
            _ = self.interrupt.recv() => tracing::info!(signal = "SIGINT", "shutdown requested"),
        }
    }
}
