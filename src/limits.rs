//! The open-file limit: read it, and raise the soft limit to the hard one at start, so that
//! thousands of tokens (one lock file each) start under systemd's default soft limit of 1,024.

/// (soft, hard) `RLIMIT_NOFILE`, `None` when it cannot be read. `u64::MAX` means unlimited.
pub fn open_files() -> Option<(u64, u64)> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    #[allow(unsafe_code)]
    // SAFETY: getrlimit writes into the struct we own; no other precondition.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) };
    (rc == 0).then_some((lim.rlim_cur, lim.rlim_max))
}

/// Raises the soft open-file limit to the hard one. Returns the limit now in force. Fails
/// with EPERM under `SystemCallFilter=~@resources`, where the unit's `LimitNOFILE=` applies.
pub fn raise_open_files() -> std::io::Result<u64> {
    let (soft, hard) = open_files().ok_or_else(std::io::Error::last_os_error)?;
    if soft >= hard {
        return Ok(soft);
    }
    let lim = libc::rlimit { rlim_cur: hard, rlim_max: hard };
    #[allow(unsafe_code)]
    // SAFETY: setrlimit reads the struct we own; no other precondition.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) };
    if rc == 0 { Ok(hard) } else { Err(std::io::Error::last_os_error()) }
}

/// Whether an I/O error is "too many open files" (EMFILE for the process, ENFILE system-wide).
pub fn is_too_many_files(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}
