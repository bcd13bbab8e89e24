//! The allocator's free pages go back to the operating system. A test
//! binary of its own: the resident size it reads is its whole process's.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Many small blocks freed below one still in use stay resident (the heap
/// cannot shrink past the live block) until they are given back: then the
/// resident size falls by most of them.
#[test]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn freed_memory_is_given_back() {
    use kappa_runtime::memory::{give_back_free_pages, limit_arenas};
    assert!(limit_arenas(4), "glibc accepts an arena limit");
    // 64 MiB of 1 KiB blocks (below the mmap threshold, so from the heap),
    // then one kept block above them.
    let blocks: Vec<Vec<u8>> = (0..65_536).map(|i| vec![(i % 251) as u8; 1024]).collect();
    let keep = vec![1u8; 1024];
    drop(blocks);
    let before = rss_kib().expect("VmRSS");
    assert!(give_back_free_pages(), "there were free pages to give back");
    let after = rss_kib().expect("VmRSS");
    assert!(
        before.saturating_sub(after) > 32 * 1024,
        "giving back 64 MiB of freed blocks lowers the resident size by more than half of it: {before} KiB -> {after} KiB"
    );
    assert_eq!(keep[0], 1);
}
