//! Process resource limits.

/// Raises the soft limit on open files to the hard limit, so a broker or a
/// fleet with thousands of connections does not run out of descriptors.
/// Returns the limit now in force.
#[allow(unsafe_code)]
pub fn raise_open_files() -> std::io::Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(lim.rlim_cur)
}

/// Space on the filesystem holding `path`: `(available to this user, total)` bytes.
#[allow(unsafe_code)]
pub fn disk_space(path: &std::path::Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: an all-zero statvfs is a valid value for statvfs to overwrite.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a struct statvfs fills in.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let unit = st.f_frsize as u64;
    Ok((st.f_bavail as u64 * unit, st.f_blocks as u64 * unit))
}

#[cfg(test)]
mod tests {
    #[test]
    fn disk_space_is_read_for_an_existing_path() {
        let (free, total) = super::disk_space(std::path::Path::new(".")).unwrap();
        assert!(total > 0 && free <= total, "{free} of {total}");
        assert!(super::disk_space(std::path::Path::new("/no/such/dir")).is_err());
    }

    #[test]
    fn the_soft_limit_reaches_the_hard_limit() {
        let now = super::raise_open_files().unwrap();
        assert!(now >= 64, "{now}");
    }
}
