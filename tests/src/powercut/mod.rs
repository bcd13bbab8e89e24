//! A filesystem that forgets what was not fsynced, on command: the power cut
//! of the power-cut tests (tests/e2e/power_cut.rs, docs/reliability.md).
//!
//! A SIGKILL keeps every byte a process wrote: the kernel has it. A power cut
//! keeps only what reached the disk, which for an application means what it
//! fsynced. [`PowerCut`] mounts a FUSE filesystem that passes every operation
//! through to a backing directory and remembers, per file, what each write
//! since that file's last fsync overwrote (an undo log) and how long the file
//! was at that fsync. [`PowerCut::cut`] stops the machine (every later write
//! fails with EIO, so nothing more becomes durable), and after the test has
//! killed the processes, [`PowerCut::restore`] rolls every file back to its
//! last fsync: the state a disk would hold after the power came back.
//!
//! The model is LazyFS's (github.com/dsrhaslab/lazyfs), simplified to what
//! the tests need: file contents are lost, names are not. Creating, renaming
//! and deleting files count as durable at once (a journaling filesystem's
//! metadata), so the tests find lost data, not lost directory entries. Writes
//! reach this process synchronously (no FUSE write-back cache), so a write
//! the application saw succeed is one the undo log knows about.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, MountOption};
use libc::{EIO, ENOENT};

mod fs;

use self::fs::CutFs;

/// No attribute or entry caching in the kernel: after a restore, sizes and
/// contents must be read again from the backing files.
const TTL: Duration = Duration::ZERO;
const ROOT: u64 = 1;

/// A mounted power-cut filesystem. Unmounted when dropped.
pub struct PowerCut {
    state: Arc<Mutex<State>>,
    mountpoint: PathBuf,
    _session: fuser::BackgroundSession,
}

/// What a restore rolled back.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// Files that had writes since their last fsync.
    pub files: u64,
    /// Bytes of unsynced writes undone (overwrites restored plus tails cut off).
    pub bytes: u64,
}

impl PowerCut {
    /// Mounts at `mountpoint` (created if missing) a filesystem whose files
    /// live in `backing` (created if missing). Needs root and /dev/fuse.
    pub fn mount(backing: &Path, mountpoint: &Path) -> io::Result<PowerCut> {
        std::fs::create_dir_all(backing)?;
        std::fs::create_dir_all(mountpoint)?;
        let state = Arc::new(Mutex::new(State::new(backing.to_path_buf())));
        let fs = CutFs { state: state.clone() };
        let options = [MountOption::FSName("kappa-powercut".into()), MountOption::NoAtime];
        let session = fuser::spawn_mount2(fs, mountpoint, &options)?;
        Ok(PowerCut { state, mountpoint: mountpoint.to_path_buf(), _session: session })
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The power goes: from now on every write, truncate, create, rename,
    /// delete and fsync fails with EIO, so nothing more becomes durable.
    /// Kill the processes using the filesystem, then [`PowerCut::restore`].
    pub fn cut(&self) {
        lock(&self.state).dead = true;
    }

    /// The power comes back: every file is rolled back to what its last
    /// fsync made durable, and the filesystem accepts writes again.
    pub fn restore(&self) -> io::Result<Restored> {
        let mut state = lock(&self.state);
        let mut restored = Restored::default();
        let pending = std::mem::take(&mut state.unsynced);
        for (ino, undo) in pending {
            let Some(path) = state.paths.get(&ino).map(|p| state.backing.join(p)) else {
                continue; // deleted since: names are durable at once
            };
            let file = OpenOptions::new().write(true).open(&path)?;
            let len = file.metadata()?.len();
            restored.files += 1;
            restored.bytes += len.saturating_sub(undo.durable_len);
            file.set_len(undo.durable_len)?;
            for (offset, bytes) in undo.overwritten.iter().rev() {
                file.write_all_at(bytes, *offset)?;
                restored.bytes += bytes.len() as u64;
            }
        }
        state.dead = false;
        Ok(restored)
    }

    /// Files written since their last fsync (what a cut now would roll back).
    pub fn unsynced_files(&self) -> usize {
        lock(&self.state).unsynced.len()
    }
}

impl std::fmt::Debug for PowerCut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PowerCut").field("mountpoint", &self.mountpoint).finish_non_exhaustive()
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic in the filesystem thread leaves the state as consistent as the
    // operation that panicked; the test reports that panic on its own.
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a file held at its last fsync, as far as later writes changed it.
#[derive(Debug)]
struct Undo {
    /// The file's length at its last fsync (or when first written here).
    durable_len: u64,
    /// `(offset, bytes before the write)` for every write below `durable_len`, oldest first.
    overwritten: Vec<(u64, Vec<u8>)>,
}

#[derive(Debug)]
struct State {
    backing: PathBuf,
    /// Inode → path relative to `backing`; the root is the empty path.
    paths: HashMap<u64, PathBuf>,
    inos: HashMap<PathBuf, u64>,
    next_ino: u64,
    handles: HashMap<u64, (u64, File)>,
    next_fh: u64,
    unsynced: HashMap<u64, Undo>,
    /// Between [`PowerCut::cut`] and [`PowerCut::restore`].
    dead: bool,
}

impl State {
    fn new(backing: PathBuf) -> State {
        State {
            backing,
            paths: HashMap::from([(ROOT, PathBuf::new())]),
            inos: HashMap::from([(PathBuf::new(), ROOT)]),
            next_ino: ROOT + 1,
            handles: HashMap::new(),
            next_fh: 1,
            unsynced: HashMap::new(),
            dead: false,
        }
    }

    fn path(&self, ino: u64) -> Result<PathBuf, i32> {
        self.paths.get(&ino).map(|p| self.backing.join(p)).ok_or(ENOENT)
    }

    fn child(&self, parent: u64, name: &OsStr) -> Result<PathBuf, i32> {
        self.paths.get(&parent).map(|p| p.join(name)).ok_or(ENOENT)
    }

    fn ino_of(&mut self, relative: PathBuf) -> u64 {
        if let Some(ino) = self.inos.get(&relative) {
            return *ino;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.paths.insert(ino, relative.clone());
        self.inos.insert(relative, ino);
        ino
    }

    fn forget_path(&mut self, relative: &Path) {
        if let Some(ino) = self.inos.remove(relative) {
            self.paths.remove(&ino);
            self.unsynced.remove(&ino);
        }
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, i32> {
        let meta = std::fs::symlink_metadata(self.path(ino)?).map_err(errno)?;
        Ok(attr_of(ino, &meta))
    }

    fn live(&self) -> Result<(), i32> {
        if self.dead { Err(EIO) } else { Ok(()) }
    }

    /// Before bytes `[offset, offset + len)` of `ino` change (or, for a
    /// truncate, everything from `offset` on): keep what they were if they
    /// were durable.
    fn remember(&mut self, ino: u64, file: &File, offset: u64, len: u64) -> Result<(), i32> {
        let current = file.metadata().map_err(errno)?.len();
        let undo = self.unsynced.entry(ino).or_insert(Undo { durable_len: current, overwritten: Vec::new() });
        let end = offset.saturating_add(len).min(undo.durable_len).min(current);
        if offset < end {
            let mut old = vec![0; (end - offset) as usize];
            file.read_exact_at(&mut old, offset).map_err(errno)?;
            undo.overwritten.push((offset, old));
        }
        Ok(())
    }

    fn open_file(&self, ino: u64, flags: i32) -> Result<File, i32> {
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY;
        OpenOptions::new().read(true).write(write).open(self.path(ino)?).map_err(errno)
    }
}

fn errno(e: io::Error) -> i32 {
    e.raw_os_error().unwrap_or(EIO)
}

fn attr_of(ino: u64, meta: &std::fs::Metadata) -> FileAttr {
    let time = |secs: i64, nanos: i64| {
        UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64) + Duration::from_nanos(nanos.max(0) as u64)
    };
    let kind = if meta.is_dir() {
        FileType::Directory
    } else if meta.file_type().is_symlink() {
        FileType::Symlink
    } else {
        FileType::RegularFile
    };
    FileAttr {
        ino,
        size: meta.len(),
        blocks: meta.blocks(),
        atime: time(meta.atime(), meta.atime_nsec()),
        mtime: time(meta.mtime(), meta.mtime_nsec()),
        ctime: time(meta.ctime(), meta.ctime_nsec()),
        crtime: SystemTime::UNIX_EPOCH,
        kind,
        perm: (meta.mode() & 0o7777) as u16,
        nlink: meta.nlink() as u32,
        uid: meta.uid(),
        gid: meta.gid(),
        rdev: meta.rdev() as u32,
        blksize: meta.blksize() as u32,
        flags: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mounted() -> (tempfile::TempDir, PowerCut) {
        let dir = tempfile::tempdir().unwrap();
        let cut = PowerCut::mount(&dir.path().join("backing"), &dir.path().join("mnt"))
            .expect("mount the power-cut filesystem (needs root and /dev/fuse)");
        (dir, cut)
    }

    #[test]
    fn a_cut_keeps_what_was_fsynced_and_forgets_the_rest() {
        let (_dir, cut) = mounted();
        let path = cut.mountpoint().join("log");
        let mut file = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
        file.write_all(b"durable ").unwrap();
        file.sync_all().unwrap();
        file.write_all(b"volatile").unwrap(); // appended, not synced
        file.write_all_at(b"DUR", 0).unwrap(); // overwrites synced bytes, not synced
        assert_eq!(std::fs::read(&path).unwrap(), b"DURable volatile");

        cut.cut();
        assert_eq!(file.write_all(b"x").unwrap_err().raw_os_error(), Some(EIO), "a dead machine writes nothing");
        assert_eq!(file.sync_all().unwrap_err().raw_os_error(), Some(EIO), "nor syncs");
        drop(file);
        let restored = cut.restore().unwrap();

        assert_eq!(std::fs::read(&path).unwrap(), b"durable ", "back to the last fsync");
        assert_eq!(restored, Restored { files: 1, bytes: 8 + 3 });
    }

    #[test]
    fn truncation_since_the_last_fsync_is_undone_and_new_files_come_back_empty() {
        let (_dir, cut) = mounted();
        let kept = cut.mountpoint().join("kept");
        let mut file = File::create(&kept).unwrap();
        file.write_all(b"0123456789").unwrap();
        file.sync_all().unwrap();
        file.set_len(4).unwrap();
        std::fs::create_dir(cut.mountpoint().join("sub")).unwrap();
        let fresh = cut.mountpoint().join("sub/fresh");
        std::fs::write(&fresh, b"never synced").unwrap();
        let renamed = cut.mountpoint().join("renamed");
        std::fs::rename(&kept, &renamed).unwrap();

        cut.cut();
        drop(file);
        cut.restore().unwrap();

        assert_eq!(std::fs::read(&renamed).unwrap(), b"0123456789", "the truncate was not synced");
        assert_eq!(std::fs::read(&fresh).unwrap(), b"", "names survive, unsynced contents do not");
        // After the restore the filesystem is writable again.
        std::fs::write(&fresh, b"again").unwrap();
        assert_eq!(std::fs::read(&fresh).unwrap(), b"again");
    }

    #[test]
    fn sqlite_in_wal_mode_keeps_exactly_the_commits_a_full_sync_promised() {
        let (_dir, cut) = mounted();
        let db = cut.mountpoint().join("t.sqlite");
        let open = |sync: &str| {
            let conn = rusqlite::Connection::open(&db).unwrap();
            conn.execute_batch(&format!("PRAGMA journal_mode=WAL; PRAGMA synchronous={sync};")).unwrap();
            conn
        };
        let conn = open("FULL");
        conn.execute_batch("CREATE TABLE t(x INTEGER)").unwrap();
        for x in 0..50 {
            conn.execute("INSERT INTO t VALUES (?1)", [x]).unwrap();
        }
        // synchronous=NORMAL in WAL mode skips the fsync at commit: these go.
        conn.execute_batch("PRAGMA synchronous=NORMAL").unwrap();
        for x in 50..80 {
            conn.execute("INSERT INTO t VALUES (?1)", [x]).unwrap();
        }
        cut.cut();
        drop(conn);
        assert!(cut.restore().unwrap().bytes > 0);

        let conn = open("FULL");
        let (count, max): (i64, i64) =
            conn.query_row("SELECT count(*), max(x) FROM t", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        assert_eq!((count, max), (50, 49), "every FULL commit and none of the NORMAL ones");
        let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(check, "ok");
    }
}
