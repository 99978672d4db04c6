//! Keeping key material inside the agent: a process that cannot be dumped
//! or traced by its own uid, no core files, and buffers for raw key bytes
//! in pages that are locked in RAM (never swapped), left out of core dumps,
//! wiped in forked children, and zeroized before they are unlocked and freed.

use std::{
    fmt, io,
    ptr::NonNull,
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
};

use rustix::{
    mm::{Advice, MapFlags, ProtFlags},
    process::{DumpableBehavior, Resource, Rlimit},
};

static NON_DUMPABLE: AtomicBool = AtomicBool::new(false);
static CORE_LIMIT_ZERO: AtomicBool = AtomicBool::new(false);
/// Bytes of key buffers locked in RAM right now.
static LOCKED_BYTES: AtomicUsize = AtomicUsize::new(0);
/// Key buffers (ever) whose pages could not be locked.
static LOCK_FAILURES: AtomicUsize = AtomicUsize::new(0);

/// How well key memory is protected, for logs and status reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protection {
    /// `PR_SET_DUMPABLE` is 0: no core dumps, no ptrace or `/proc/PID/mem`
    /// reads by processes of the same uid.
    pub non_dumpable: bool,
    /// `RLIMIT_CORE` is 0.
    pub core_limit_zero: bool,
    /// Bytes of raw key material locked in RAM now.
    pub locked_bytes: usize,
    /// Key buffers that could not be locked (`RLIMIT_MEMLOCK` too small).
    pub lock_failures: usize,
}

impl Protection {
    /// The protection in force now.
    pub fn current() -> Self {
        Protection {
            non_dumpable: NON_DUMPABLE.load(Ordering::Relaxed),
            core_limit_zero: CORE_LIMIT_ZERO.load(Ordering::Relaxed),
            locked_bytes: LOCKED_BYTES.load(Ordering::Relaxed),
            lock_failures: LOCK_FAILURES.load(Ordering::Relaxed),
        }
    }

    /// "protected" when every measure is in force, else "degraded".
    pub fn state(&self) -> &'static str {
        if self.non_dumpable && self.core_limit_zero && self.lock_failures == 0 {
            "protected"
        } else {
            "degraded"
        }
    }
}

impl fmt::Display for Protection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (non-dumpable: {}, core limit 0: {}, locked key bytes: {}, lock failures: {})",
            self.state(),
            self.non_dumpable,
            self.core_limit_zero,
            self.locked_bytes,
            self.lock_failures
        )
    }
}

/// Makes the process non-dumpable and sets its core limit to 0. Call it
/// before any key is read. Failures are reported, not fatal: they show in
/// [`Protection`].
pub fn harden_process() -> Protection {
    match rustix::process::set_dumpable_behavior(DumpableBehavior::NotDumpable) {
        Ok(()) => NON_DUMPABLE.store(true, Ordering::Relaxed),
        Err(error) => tracing::warn!(%error, "cannot make the process non-dumpable"),
    }
    let zero = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    match rustix::process::setrlimit(Resource::Core, zero) {
        Ok(()) => CORE_LIMIT_ZERO.store(true, Ordering::Relaxed),
        Err(error) => tracing::warn!(%error, "cannot set the core file limit to 0"),
    }
    Protection::current()
}

/// A fixed-capacity byte buffer for raw key material in its own locked,
/// undumpable pages. It never reallocates, so no copy is left behind.
pub struct LockedBuf {
    pages: NonNull<u8>,
    /// The mapped size, whole pages.
    mapped: usize,
    len: usize,
    locked: bool,
}

// SAFETY: the buffer exclusively owns its mapping; nothing else aliases it.
#[allow(unsafe_code)]
unsafe impl Send for LockedBuf {}
// SAFETY: shared access only reads through `&self`.
#[allow(unsafe_code)]
unsafe impl Sync for LockedBuf {}

impl LockedBuf {
    /// Maps room for `capacity` bytes and tries to lock it. A failure to
    /// lock (e.g. a small `RLIMIT_MEMLOCK`) is counted, not fatal; callers
    /// that require locking check [`LockedBuf::is_locked`].
    #[allow(unsafe_code)]
    pub fn with_capacity(capacity: usize) -> io::Result<Self> {
        let page = rustix::param::page_size();
        let mapped = capacity.max(1).div_ceil(page) * page;
        // SAFETY: a fresh private anonymous mapping aliases no Rust memory.
        let address = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                mapped,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        }?;
        let pages = NonNull::new(address.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned null"))?;
        // SAFETY: advice and locking apply to the mapping made just above.
        let locked = unsafe {
            // Best effort: a kernel without these advices still gets the
            // zeroize-on-drop and the lock.
            let _ = rustix::mm::madvise(address, mapped, Advice::LinuxDontDump);
            let _ = rustix::mm::madvise(address, mapped, Advice::LinuxWipeOnFork);
            rustix::mm::mlock(address, mapped).is_ok()
        };
        if locked {
            LOCKED_BYTES.fetch_add(mapped, Ordering::Relaxed);
        } else {
            LOCK_FAILURES.fetch_add(1, Ordering::Relaxed);
        }
        Ok(LockedBuf {
            pages,
            mapped,
            len: 0,
            locked,
        })
    }

    /// Whether the pages are locked in RAM.
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The room left before the buffer is full.
    pub fn spare(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.all_mut()[len..]
    }

    /// Marks `count` more bytes of [`LockedBuf::spare`] as filled.
    pub fn advance(&mut self, count: usize) {
        self.len = (self.len + count).min(self.mapped);
    }

    /// Appends `bytes`; fails if they do not fit (it never grows).
    pub fn extend_from_slice(&mut self, bytes: &[u8]) -> io::Result<()> {
        let spare = self.spare();
        if bytes.len() > spare.len() {
            return Err(io::Error::other("locked key buffer is full"));
        }
        spare[..bytes.len()].copy_from_slice(bytes);
        self.advance(bytes.len());
        Ok(())
    }

    /// Shortens the buffer, zeroizing what is cut off.
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            let old = self.len;
            zeroize::Zeroize::zeroize(&mut self.all_mut()[len..old]);
            self.len = len;
        }
    }

    #[allow(unsafe_code)]
    fn all_mut(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `mapped` bytes, readable and writable, and
        // owned by `self`, borrowed mutably here.
        unsafe { std::slice::from_raw_parts_mut(self.pages.as_ptr(), self.mapped) }
    }
}

impl std::ops::Deref for LockedBuf {
    type Target = [u8];

    #[allow(unsafe_code)]
    fn deref(&self) -> &[u8] {
        // SAFETY: the first `len` bytes of the owned mapping are initialized
        // (anonymous mappings start zeroed).
        unsafe { std::slice::from_raw_parts(self.pages.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for LockedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.all_mut()[..len]
    }
}

impl Drop for LockedBuf {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // Zeroized while still locked, so the key never reaches swap.
        zeroize::Zeroize::zeroize(self.all_mut());
        let address = self.pages.as_ptr().cast();
        // SAFETY: unlocking and unmapping our own mapping, which nothing
        // borrows any more.
        unsafe {
            if self.locked {
                let _ = rustix::mm::munlock(address, self.mapped);
                LOCKED_BYTES.fetch_sub(self.mapped, Ordering::Relaxed);
            }
            let _ = rustix::mm::munmap(address, self.mapped);
        }
    }
}

impl fmt::Debug for LockedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockedBuf")
            .field("len", &self.len)
            .field("locked", &self.locked)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_fills_truncates_and_never_grows() {
        let mut buffer = LockedBuf::with_capacity(10).unwrap();
        buffer.extend_from_slice(b"secret").unwrap();
        assert_eq!(&buffer[..], b"secret");
        buffer.truncate(3);
        assert_eq!(&buffer[..], b"sec");
        let capacity = buffer.len() + buffer.spare().len();
        assert_eq!(capacity % rustix::param::page_size(), 0);
        assert!(buffer.extend_from_slice(&vec![1; capacity]).is_err());
        assert!(!format!("{buffer:?}").contains("sec"));
    }

    #[test]
    fn locked_bytes_are_counted() {
        let buffer = LockedBuf::with_capacity(1).unwrap();
        // Root may always lock; others within RLIMIT_MEMLOCK (usually 8 MiB).
        if rustix::process::geteuid().is_root() {
            assert!(buffer.is_locked());
        }
        if buffer.is_locked() {
            assert!(Protection::current().locked_bytes >= rustix::param::page_size());
        }
    }
}
