//! Working under systemd: readiness, status, reload and stop notifications,
//! the watchdog, and sockets passed by socket activation. Every function is
//! a no-op when systemd did not start the agent.

use std::{io, os::unix::net::UnixListener, time::Duration};

use sd_notify::NotifyState;

/// Tells systemd the agent serves (keys loaded, self-test passed, socket
/// listening), with a one-line status for `systemctl status`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells systemd a reload began; `MONOTONIC_USEC` lets it match the
/// following `READY=1` to this reload.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// Tells systemd the agent is stopping.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "could not notify systemd");
    }
}

/// Pets systemd's watchdog at half its interval, forever, when the service
/// has `WatchdogSec=`. It runs on the serving runtime, so an agent whose
/// runtime stalls stops petting and is restarted.
pub async fn watchdog() {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return std::future::pending().await;
    };
    let mut ticks = tokio::time::interval((interval / 2).max(Duration::from_millis(10)));
    loop {
        ticks.tick().await;
        send(&[NotifyState::Watchdog]);
    }
}

/// The listening socket systemd passed (`LISTEN_FDS`), made non-blocking
/// (systemd passes it blocking); `None` when none was passed.
pub fn activated_listener() -> io::Result<Option<UnixListener>> {
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() == 0 {
        return Ok(None);
    }
    let listener = fds.take_unix_listener(0)?.ok_or_else(|| {
        io::Error::other("systemd passed a socket that is not a listening Unix stream socket: use ListenStream=PATH in skykit-agent.socket")
    })?;
    listener.set_nonblocking(true)?;
    Ok(Some(listener))
}
