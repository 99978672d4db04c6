//! The agent's Unix socket file: created so that no other user can connect
//! before its mode is set, never clobbering a live agent or a file that is
//! not a socket, and removed on a clean exit only if it is still ours.

use std::{
    fs, io,
    os::unix::{
        fs::{DirBuilderExt, FileTypeExt, MetadataExt},
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
};

use rustix::{
    fs::Mode,
    net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType},
};

/// A socket directory the agent creates is private to its user...
const PRIVATE_DIRECTORY_MODE: u32 = 0o700;
/// ...or, when the socket has a group, traversable by that group too.
const GROUP_DIRECTORY_MODE: u32 = 0o750;
/// Pending connections the kernel queues before `accept`.
const BACKLOG: i32 = 1024;

/// Why the agent cannot listen at its socket path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "another skykit-agent is already listening on {}: stop it first, or pass a different --socket",
        path.display()
    )]
    InUse { path: PathBuf },
    #[error(
        "{} exists and is {what}, not a socket; the agent never removes it: move it away or pass a different --socket",
        path.display()
    )]
    NotASocket { path: PathBuf, what: &'static str },
    #[error(
        "socket path {} is {length} bytes, over the kernel's limit of 107: choose a shorter --socket",
        path.display()
    )]
    TooLong { path: PathBuf, length: usize },
    #[error(
        "cannot give {} to group {gid}: {source}; the agent's user must be a member of socket_group",
        path.display()
    )]
    Group {
        path: PathBuf,
        gid: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot create socket directory {}: {source}", path.display())]
    Directory {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {}: {source}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A listening socket bound at a path; dropping it removes the file if it
/// is still the one we created.
#[derive(Debug)]
pub struct BoundSocket {
    listener: Option<UnixListener>,
    path: PathBuf,
    /// (device, inode) of the file we bound, so we never unlink a socket a
    /// newer agent put at the same path.
    identity: (u64, u64),
}

impl BoundSocket {
    /// Takes the listener (non-blocking) to serve on.
    pub fn take_listener(&mut self) -> Option<UnixListener> {
        self.listener.take()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the path still holds the socket we bound (not deleted, not
    /// replaced by another file).
    pub fn is_intact(&self) -> bool {
        fs::symlink_metadata(&self.path)
            .map(|metadata| (metadata.dev(), metadata.ino()) == self.identity)
            .unwrap_or(false)
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        if !self.is_intact() {
            return;
        }
        if let Err(error) = fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), %error, "could not remove the socket file");
        }
    }
}

/// Who may connect to a socket the agent binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// Permission bits of the socket file, e.g. 0o600.
    pub mode: u32,
    /// The socket file's group (and its directory's, if the agent creates it).
    pub group: Option<u32>,
}

/// Binds `path` with the given access, replacing a stale socket left by a
/// crashed agent but refusing a live one, a regular file or a symlink.
pub fn bind(path: &Path, access: Access) -> Result<BoundSocket, Error> {
    let length = path.as_os_str().len();
    if length > 107 {
        return Err(Error::TooLong {
            path: path.to_owned(),
            length,
        });
    }
    prepare_directory(path, access.group)?;
    remove_if_stale(path)?;
    let bind_error = |source: io::Error| Error::Bind {
        path: path.to_owned(),
        source,
    };
    let address = SocketAddrUnix::new(path).map_err(|errno| bind_error(errno.into()))?;
    let socket = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(|errno| bind_error(errno.into()))?;
    rustix::net::bind(&socket, &address).map_err(|errno| match errno {
        rustix::io::Errno::ADDRINUSE => Error::InUse {
            path: path.to_owned(),
        },
        other => bind_error(other.into()),
    })?;
    // Connecting needs a listening socket, so setting owner and mode before
    // listen(2) leaves no window in which another user could connect.
    if let Some(gid) = access.group {
        rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(gid))).map_err(|errno| {
            Error::Group {
                path: path.to_owned(),
                gid,
                source: errno.into(),
            }
        })?;
    }
    rustix::fs::chmod(path, Mode::from_raw_mode(access.mode))
        .map_err(|errno| bind_error(errno.into()))?;
    rustix::net::listen(&socket, BACKLOG).map_err(|errno| bind_error(errno.into()))?;
    let metadata = fs::symlink_metadata(path).map_err(bind_error)?;
    Ok(BoundSocket {
        listener: Some(UnixListener::from(socket)),
        path: path.to_owned(),
        identity: (metadata.dev(), metadata.ino()),
    })
}

fn prepare_directory(path: &Path, group: Option<u32>) -> Result<(), Error> {
    let Some(parent) = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    else {
        return Ok(());
    };
    if parent.exists() {
        return Ok(());
    }
    let directory_error = |source: io::Error| Error::Directory {
        path: parent.to_owned(),
        source,
    };
    // Created private first and only then opened to the group, so the
    // directory is never wider than intended.
    fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIRECTORY_MODE)
        .create(parent)
        .map_err(directory_error)?;
    if let Some(gid) = group {
        rustix::fs::chown(parent, None, Some(rustix::fs::Gid::from_raw(gid)))
            .map_err(|errno| directory_error(errno.into()))?;
        rustix::fs::chmod(parent, Mode::from_raw_mode(GROUP_DIRECTORY_MODE))
            .map_err(|errno| directory_error(errno.into()))?;
    }
    Ok(())
}

/// Removes a socket file nobody listens on; refuses anything else.
fn remove_if_stale(path: &Path) -> Result<(), Error> {
    let metadata = match fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(Error::Bind {
                path: path.to_owned(),
                source,
            });
        }
    };
    let file_type = metadata.file_type();
    if !file_type.is_socket() {
        let what = if file_type.is_symlink() {
            "a symbolic link"
        } else if file_type.is_dir() {
            "a directory"
        } else if file_type.is_file() {
            "a regular file"
        } else {
            "a special file"
        };
        return Err(Error::NotASocket {
            path: path.to_owned(),
            what,
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(Error::InUse {
            path: path.to_owned(),
        }),
        Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "replacing a stale socket left by an agent that is gone");
            fs::remove_file(path).map_err(|source| Error::Bind {
                path: path.to_owned(),
                source,
            })
        }
        Err(source) => Err(Error::Bind {
            path: path.to_owned(),
            source,
        }),
    }
}
