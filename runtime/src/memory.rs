//! The C allocator's footprint. glibc's malloc gives each thread that
//! allocates under contention an arena of its own (up to eight per core) and
//! keeps freed memory in them for reuse; a service whose threads allocate in
//! bursts (a commit, a batch loaded and encoded) keeps the peak of every
//! arena resident. These two calls bound that; elsewhere they do nothing.

/// Limits the allocator to `arenas` arenas (glibc's `M_ARENA_MAX`). Call it
/// first thing in `main`, before threads start. Whether the limit was set.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn limit_arenas(arenas: u16) -> bool {
    // SAFETY: mallopt takes two integers and only changes the allocator's
    // tuning; it is safe to call at any time, from any thread.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, i32::from(arenas.max(1))) == 1 }
}

/// Limits the allocator's arenas: not on this platform.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn limit_arenas(_arenas: u16) -> bool {
    false
}

/// Returns the allocator's free pages to the operating system (glibc's
/// `malloc_trim`), in every arena and not only at the heap's top. Cheap
/// enough to call every few seconds. Whether any memory was released.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn give_back_free_pages() -> bool {
    // SAFETY: malloc_trim takes the padding to keep and touches only the
    // allocator's own free lists, under its locks.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Returns free pages to the operating system: not on this platform.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn give_back_free_pages() -> bool {
    false
}
