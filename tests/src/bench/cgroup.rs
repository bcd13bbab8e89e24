//! A cgroup (v1: the `cpu` hierarchy, and `memory` when a limit is given)
//! that gives the processes in it a fixed budget: how a benchmark gives a
//! process a gateway-sized or node-sized share of this machine. Root only.

use std::path::{Path, PathBuf};

/// A cgroup, removed when dropped (once its processes have exited).
#[derive(Debug)]
pub struct Cgroup {
    cpu: PathBuf,
    memory: Option<PathBuf>,
}

impl Cgroup {
    /// A cgroup of `cpu_quota_us` of CPU time per 100 ms period (50,000 is
    /// half a core) and, if given, a memory limit; the reason when cgroups
    /// cannot be made here.
    pub fn new(name: &str, cpu_quota_us: u64, memory_bytes: Option<u64>) -> Result<Cgroup, String> {
        let made = Cgroup {
            cpu: Path::new("/sys/fs/cgroup/cpu").join(name),
            memory: memory_bytes.map(|_| Path::new("/sys/fs/cgroup/memory").join(name)),
        };
        let write = |p: &Path, v: String| std::fs::write(p, v).map_err(|e| format!("{}: {e}", p.display()));
        for d in made.dirs() {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        write(&made.cpu.join("cpu.cfs_period_us"), "100000".into())?;
        write(&made.cpu.join("cpu.cfs_quota_us"), cpu_quota_us.to_string())?;
        if let (Some(mem), Some(bytes)) = (&made.memory, memory_bytes) {
            write(&mem.join("memory.limit_in_bytes"), bytes.to_string())?;
        }
        Ok(made)
    }

    fn dirs(&self) -> impl Iterator<Item = &PathBuf> {
        std::iter::once(&self.cpu).chain(self.memory.as_ref())
    }

    /// Moves the process `pid` (all its threads) into the cgroup.
    pub fn add(&self, pid: u32) -> Result<(), String> {
        for d in self.dirs() {
            std::fs::write(d.join("cgroup.procs"), pid.to_string()).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        Ok(())
    }

    /// Periods in which the cgroup used up its quota and waited.
    pub fn throttled_periods(&self) -> u64 {
        let stat = std::fs::read_to_string(self.cpu.join("cpu.stat")).unwrap_or_default();
        stat.lines().find_map(|l| l.strip_prefix("nr_throttled ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    }

    /// How often the memory limit was hit, and whether the OOM killer acted.
    pub fn memory_events(&self) -> (u64, bool) {
        let Some(mem) = &self.memory else { return (0, false) };
        let read = |f: &str| std::fs::read_to_string(mem.join(f)).unwrap_or_default();
        let failcnt = read("memory.failcnt").trim().parse().unwrap_or(0);
        let killed = read("memory.oom_control").lines().any(|l| l.starts_with("oom_kill ") && !l.ends_with(" 0"));
        (failcnt, killed)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for d in self.dirs() {
            let _ = std::fs::remove_dir(d);
        }
    }
}
