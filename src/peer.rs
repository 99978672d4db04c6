//! Who is calling: the kernel's peer credentials of each accepted Unix
//! connection, read once at accept and attached to every request on it.

use std::{
    fmt,
    future::Future as _,
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures_core::Stream;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{UnixListener, UnixStream},
    sync::{Notify, futures::OwnedNotified},
    time::Sleep,
};
use tonic::transport::server::Connected;

/// How long to stop accepting after the process runs out of file
/// descriptors or memory: long enough not to spin, short enough to recover
/// quickly once connections close.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// The HTTP/2 client preface: `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
const PREFACE_LEN: usize = 24;

/// The caller's identity as the kernel captured it at `connect(2)`
/// (`SO_PEERCRED`): it cannot be forged by the caller afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    /// For logs only: a pid can be reused once the caller exits.
    pub pid: Option<i32>,
}

impl Peer {
    /// A caller whose credentials were not captured (not a Unix socket).
    pub const UNKNOWN: Peer = Peer {
        uid: u32::MAX,
        gid: u32::MAX,
        pid: None,
    };

    /// Reads the peer credentials of a connected Unix socket.
    pub fn of(stream: &UnixStream) -> io::Result<Self> {
        let credentials = rustix::net::sockopt::socket_peercred(stream)?;
        Ok(Peer {
            uid: credentials.uid.as_raw(),
            gid: credentials.gid.as_raw(),
            pid: Some(credentials.pid.as_raw_nonzero().get()),
        })
    }
}

/// Everything known about a caller, captured once per connection at accept
/// and shared by every request on it (each request gets a clone: one
/// reference count).
#[derive(Debug, Clone)]
pub struct Caller(Arc<CallerInfo>);

/// What [`Caller`] holds.
#[derive(Debug)]
pub struct CallerInfo {
    pub peer: Peer,
    /// Supplementary groups (`SO_PEERGROUPS`), for policy decisions.
    pub groups: Arc<[u32]>,
    /// The caller's executable, for audit lines only; `None` when unreadable
    /// or when the caller exited before it could be read.
    pub exe: Option<Arc<str>>,
    /// Identities already audited as allowed on this connection, so the
    /// audit trail gets one line per connection and identity, not per call.
    /// Most connections use one identity: it is read without a lock.
    first_audited: std::sync::OnceLock<Arc<str>>,
    more_audited: std::sync::Mutex<Vec<Arc<str>>>,
}

impl std::ops::Deref for Caller {
    type Target = CallerInfo;

    fn deref(&self) -> &CallerInfo {
        &self.0
    }
}

impl Caller {
    pub fn new(peer: Peer, groups: Arc<[u32]>, exe: Option<Arc<str>>) -> Self {
        Caller(Arc::new(CallerInfo {
            peer,
            groups,
            exe,
            first_audited: std::sync::OnceLock::new(),
            more_audited: std::sync::Mutex::default(),
        }))
    }

    /// A caller whose credentials were not captured: admitted by no policy.
    pub fn unknown() -> Self {
        Caller::new(Peer::UNKNOWN, Arc::from([]), None)
    }

    /// True the first time `identity` is allowed on this connection.
    pub fn first_allowed(&self, identity: &Arc<str>) -> bool {
        match self.first_audited.get() {
            Some(first) if first == identity => return false,
            Some(_) => {}
            None => match self.first_audited.set(identity.clone()) {
                Ok(()) => return true,
                // Another call on this connection set it first.
                Err(_) if self.first_audited.get() == Some(identity) => return false,
                Err(_) => {}
            },
        }
        let mut audited = self
            .more_audited
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if audited.contains(identity) {
            return false;
        }
        audited.push(identity.clone());
        true
    }

    /// Reads credentials, groups and (for audit) the executable of a
    /// freshly accepted connection.
    pub fn of(stream: &UnixStream) -> io::Result<Self> {
        let peer = Peer::of(stream)?;
        let groups = credentials::peer_groups(stream).unwrap_or_default();
        let exe = peer
            .pid
            .and_then(|pid| credentials::executable(stream, pid));
        Ok(Caller::new(peer, groups.into(), exe))
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid {} gid {}", self.uid, self.gid)?;
        if let Some(pid) = self.pid {
            write!(f, " pid {pid}")?;
        }
        Ok(())
    }
}

/// An accepted connection together with its caller's credentials; tonic
/// copies the [`Peer`] into each request's extensions.
pub struct PeerStream {
    stream: UnixStream,
    caller: Caller,
    /// Until the client has sent the HTTP/2 preface: the deadline for it
    /// and the bytes received so far. A client that connects and stalls
    /// would otherwise hold a descriptor forever (keepalive pings only
    /// start after the handshake).
    handshake: Option<(Pin<Box<Sleep>>, usize)>,
    _open: OpenConnection,
}

/// Counts a connection as open for as long as it lives, and wakes the
/// accept loop when it closes.
struct OpenConnection {
    count: Arc<AtomicUsize>,
    closed: Arc<Notify>,
}

impl OpenConnection {
    fn new(count: &Arc<AtomicUsize>, closed: &Arc<Notify>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        OpenConnection {
            count: count.clone(),
            closed: closed.clone(),
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
        self.closed.notify_one();
    }
}

impl Connected for PeerStream {
    type ConnectInfo = Caller;

    fn connect_info(&self) -> Caller {
        self.caller.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.stream).poll_read(cx, buf);
        let Some((deadline, received)) = self.handshake.as_mut() else {
            return result;
        };
        match &result {
            Poll::Ready(Ok(())) => {
                *received += buf.filled().len() - before;
                if *received >= PREFACE_LEN {
                    self.handshake = None;
                }
                result
            }
            Poll::Ready(Err(_)) => result,
            Poll::Pending => match deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    tracing::info!(
                        uid = self.caller.peer.uid,
                        pid = self.caller.peer.pid,
                        "closing a connection that did not complete the HTTP/2 handshake in time"
                    );
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no HTTP/2 preface within the handshake timeout",
                    )))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The stream of accepted connections that the gRPC server consumes.
///
/// Accept errors never end it: a per-connection error is skipped, and
/// running out of descriptors or memory pauses accepting for
/// [`ACCEPT_BACKOFF`] instead of spinning.
pub struct Incoming {
    listener: UnixListener,
    backoff: Option<Pin<Box<Sleep>>>,
    /// Open connections, for status reports and the cap.
    open: Arc<AtomicUsize>,
    /// At this many open connections, accepting pauses until one closes;
    /// new clients wait in the kernel's backlog meanwhile.
    max_connections: usize,
    closed: Arc<Notify>,
    waiting_for_close: Option<Pin<Box<OwnedNotified>>>,
    handshake_timeout: Duration,
}

impl Incoming {
    pub fn new(listener: UnixListener, open: Arc<AtomicUsize>) -> Self {
        Incoming {
            listener,
            backoff: None,
            open,
            max_connections: usize::MAX,
            closed: Arc::new(Notify::new()),
            waiting_for_close: None,
            handshake_timeout: Duration::from_secs(5),
        }
    }

    pub fn max_connections(mut self, max: usize) -> Self {
        self.max_connections = max.max(1);
        self
    }

    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }
}

impl Stream for Incoming {
    type Item = io::Result<PeerStream>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(backoff) = self.backoff.as_mut() {
                std::task::ready!(backoff.as_mut().poll(cx));
                self.backoff = None;
            }
            if let Some(waiting) = self.waiting_for_close.as_mut() {
                std::task::ready!(waiting.as_mut().poll(cx));
                self.waiting_for_close = None;
            }
            if self.open.load(Ordering::Relaxed) >= self.max_connections {
                tracing::warn!(
                    max_connections = self.max_connections,
                    "connection limit reached; new connections wait until one closes"
                );
                // A close between the check and here stores a permit in the
                // Notify, so the wake-up is not lost.
                self.waiting_for_close = Some(Box::pin(self.closed.clone().notified_owned()));
                continue;
            }
            match std::task::ready!(self.listener.poll_accept(cx)) {
                Ok((stream, _)) => match Caller::of(&stream) {
                    Ok(caller) => {
                        tracing::info!(
                            uid = caller.peer.uid,
                            gid = caller.peer.gid,
                            pid = caller.peer.pid,
                            exe = caller.exe.as_deref(),
                            "accepted connection"
                        );
                        let open = OpenConnection::new(&self.open, &self.closed);
                        let deadline = Box::pin(tokio::time::sleep(self.handshake_timeout));
                        return Poll::Ready(Some(Ok(PeerStream {
                            stream,
                            caller,
                            handshake: Some((deadline, 0)),
                            _open: open,
                        })));
                    }
                    Err(error) => {
                        tracing::warn!(%error, "dropped a connection whose peer credentials could not be read");
                    }
                },
                Err(error) if is_resource_exhaustion(&error) => {
                    tracing::warn!(%error, backoff_ms = ACCEPT_BACKOFF.as_millis() as u64, "cannot accept connections now; pausing");
                    self.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                }
                Err(error) => {
                    tracing::debug!(%error, "accept failed for one connection");
                }
            }
        }
    }
}

fn is_resource_exhaustion(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(code) if code == rustix::io::Errno::MFILE.raw_os_error()
            || code == rustix::io::Errno::NFILE.raw_os_error()
            || code == rustix::io::Errno::NOBUFS.raw_os_error()
            || code == rustix::io::Errno::NOMEM.raw_os_error()
    )
}

/// The credentials `SO_PEERCRED` does not carry, which rustix does not wrap.
mod credentials {
    #![allow(unsafe_code)]

    use std::{
        fs, io,
        os::fd::{AsRawFd, FromRawFd, OwnedFd},
    };

    use tokio::net::UnixStream;

    /// `SO_PEERGROUPS` (Linux 4.13): the peer's supplementary groups at
    /// connect time. Same value on every Linux architecture but SPARC/MIPS.
    const SO_PEERGROUPS: libc::c_int = 59;
    /// `SO_PEERPIDFD` (Linux 6.5): a pidfd for the peer process as it was
    /// at connect time, which a reused pid cannot impersonate.
    const SO_PEERPIDFD: libc::c_int = 77;

    pub fn peer_groups(stream: &UnixStream) -> io::Result<Vec<u32>> {
        let mut groups = vec![0 as libc::gid_t; 64];
        loop {
            let mut size = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
            // SAFETY: the buffer is `size` bytes of gid_t; the kernel writes
            // at most that and reports the size it needed.
            let result = unsafe {
                libc::getsockopt(
                    stream.as_raw_fd(),
                    libc::SOL_SOCKET,
                    SO_PEERGROUPS,
                    groups.as_mut_ptr().cast(),
                    &mut size,
                )
            };
            let count = size as usize / std::mem::size_of::<libc::gid_t>();
            if result == 0 {
                groups.truncate(count);
                return Ok(groups);
            }
            let error = io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::ERANGE) && count > groups.len() && count <= 65536
            {
                groups.resize(count, 0);
                continue;
            }
            return Err(error);
        }
    }

    /// The caller's executable path, read through a pidfd taken at connect
    /// time, and kept only if the pidfd shows the same process still alive
    /// afterwards (so a reused pid is never misreported).
    pub fn executable(stream: &UnixStream, pid: i32) -> Option<std::sync::Arc<str>> {
        let pidfd = peer_pidfd(stream).ok()?;
        if pidfd_pid(&pidfd)? != pid {
            return None;
        }
        let path = fs::read_link(format!("/proc/{pid}/exe")).ok()?;
        (pidfd_pid(&pidfd)? == pid).then(|| path.to_string_lossy().into())
    }

    fn peer_pidfd(stream: &UnixStream) -> io::Result<OwnedFd> {
        let mut fd: libc::c_int = -1;
        let mut size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: the kernel writes one int (the new pidfd) into `fd`.
        let result = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERPIDFD,
                (&mut fd as *mut libc::c_int).cast(),
                &mut size,
            )
        };
        if result != 0 || fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just created `fd` for us; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// The pid a pidfd refers to now: -1 once the process has exited.
    fn pidfd_pid(pidfd: &OwnedFd) -> Option<i32> {
        let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).ok()?;
        info.lines()
            .find_map(|line| line.strip_prefix("Pid:"))
            .and_then(|value| value.trim().parse().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_identity_is_first_allowed_once_per_connection() {
        let caller = Caller::new(Peer::UNKNOWN, Arc::from([]), None);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        assert!(caller.first_allowed(&a));
        assert!(!caller.first_allowed(&a));
        assert!(!caller.first_allowed(&"a".into()), "compared by name");
        assert!(caller.first_allowed(&b));
        assert!(!caller.first_allowed(&b));
        assert!(!caller.first_allowed(&a));
        let clone = caller.clone();
        assert!(
            !clone.first_allowed(&b),
            "clones share the connection's record"
        );
        let other = Caller::new(Peer::UNKNOWN, Arc::from([]), None);
        assert!(other.first_allowed(&b), "another connection audits anew");
    }

    #[test]
    fn concurrent_first_calls_audit_an_identity_once() {
        let caller = Caller::new(Peer::UNKNOWN, Arc::from([]), None);
        let names: Vec<Arc<str>> = vec!["a".into(), "b".into(), "c".into()];
        let firsts: usize = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..8)
                .map(|_| {
                    scope.spawn(|| {
                        names
                            .iter()
                            .filter(|name| caller.first_allowed(name))
                            .count()
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).sum()
        });
        assert_eq!(firsts, names.len());
    }
}
