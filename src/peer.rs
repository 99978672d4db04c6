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
    time::Sleep,
};
use tonic::transport::server::Connected;

/// How long to stop accepting after the process runs out of file
/// descriptors or memory: long enough not to spin, short enough to recover
/// quickly once connections close.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

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
    peer: Peer,
    _open: OpenConnection,
}

/// Counts a connection as open for as long as it lives.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        OpenConnection(count.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Connected for PeerStream {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
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
    /// Open connections, for status reports.
    open: Arc<AtomicUsize>,
}

impl Incoming {
    pub fn new(listener: UnixListener, open: Arc<AtomicUsize>) -> Self {
        Incoming {
            listener,
            backoff: None,
            open,
        }
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
            match std::task::ready!(self.listener.poll_accept(cx)) {
                Ok((stream, _)) => match Peer::of(&stream) {
                    Ok(peer) => {
                        tracing::info!(
                            uid = peer.uid,
                            gid = peer.gid,
                            pid = peer.pid,
                            "accepted connection"
                        );
                        let open = OpenConnection::new(&self.open);
                        return Poll::Ready(Some(Ok(PeerStream {
                            stream,
                            peer,
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
