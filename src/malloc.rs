//! glibc malloc tuning for a daemon of many idle tokens: one arena per worker thread, and the
//! memory a burst (start-up, a refresh round) freed handed back to the system afterwards.

/// Caps glibc's malloc arenas at one per CPU, as many as the runtime's worker threads. glibc's
/// default (8 per CPU) gives each of the up to 64 threads of the write pool its own arena,
/// which keeps its freed memory to itself. Call before any thread starts.
pub fn limit_arenas() {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let arenas = libc::c_int::try_from(cpus).unwrap_or(libc::c_int::MAX);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: mallopt takes two integers and changes only malloc's settings; glibc documents
    // M_ARENA_MAX as safe to set at any time (it bounds arenas created later).
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
    let _ = arenas;
}

/// Hands the free pages of every arena back to the system: after start-up (the parsed
/// config, the logins' buffers) and after refresh rounds, glibc would otherwise keep them,
/// as it returns memory only from the top of an arena.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: malloc_trim only releases free memory; it takes the arenas' locks itself.
    unsafe {
        libc::malloc_trim(0);
    }
}
