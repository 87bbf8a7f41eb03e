//! Sending a signal to another process (`tokend login` telling the daemon to adopt a login).

/// The signals tokend sends.
#[derive(Debug, Clone, Copy)]
pub enum Signal {
    Usr1,
}

/// `kill(pid, sig)`.
pub fn send(pid: u32, sig: Signal) -> std::io::Result<()> {
    let sig = match sig {
        Signal::Usr1 => libc::SIGUSR1,
    };
    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    #[allow(unsafe_code)]
    // SAFETY: kill(2) takes plain integers and has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}
