//! The FUSE side of the power-cut filesystem: every operation passes
//! through to the backing directory, and writes and truncates first tell
//! the undo log what they change.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use fuser::{
    FileType, Filesystem, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, TimeOrNow,
};
use libc::ENOENT;

use super::{State, TTL, attr_of, errno, lock};

#[derive(Debug)]
pub(super) struct CutFs {
    pub(super) state: Arc<Mutex<State>>,
}

impl CutFs {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

impl Filesystem for CutFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let mut state = self.state();
        let result = state.child(parent, name).and_then(|relative| {
            let meta = std::fs::symlink_metadata(state.backing.join(&relative)).map_err(errno)?;
            let ino = state.ino_of(relative);
            Ok(attr_of(ino, &meta))
        });
        match result {
            Ok(attr) => reply.entry(&TTL, &attr, 0),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.state().attr(ino) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let mut state = self.state();
        let result = (|| {
            let path = state.path(ino)?;
            if let Some(mode) = mode {
                state.live()?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(errno)?;
            }
            if let Some(size) = size {
                state.live()?;
                let file = OpenOptions::new().read(true).write(true).open(&path).map_err(errno)?;
                state.remember(ino, &file, size, u64::MAX)?;
                file.set_len(size).map_err(errno)?;
            }
            state.attr(ino)
        })();
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let mut state = self.state();
        let result = (|| {
            state.live()?;
            let relative = state.child(parent, name)?;
            std::fs::DirBuilder::new().mode(mode & !umask).create(state.backing.join(&relative)).map_err(errno)?;
            let ino = state.ino_of(relative);
            state.attr(ino)
        })();
        match result {
            Ok(attr) => reply.entry(&TTL, &attr, 0),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let mut state = self.state();
        let result = (|| {
            state.live()?;
            let relative = state.child(parent, name)?;
            std::fs::remove_file(state.backing.join(&relative)).map_err(errno)?;
            state.forget_path(&relative);
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let mut state = self.state();
        let result = (|| {
            state.live()?;
            let relative = state.child(parent, name)?;
            std::fs::remove_dir(state.backing.join(&relative)).map_err(errno)?;
            state.forget_path(&relative);
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        _flags: u32,
        reply: ReplyEmpty,
    ) {
        let mut state = self.state();
        let result = (|| {
            state.live()?;
            let from = state.child(parent, name)?;
            let to = state.child(newparent, newname)?;
            std::fs::rename(state.backing.join(&from), state.backing.join(&to)).map_err(errno)?;
            state.forget_path(&to);
            // Move the renamed entry and, for a directory, everything below it.
            let moved: Vec<(u64, PathBuf)> = state
                .paths
                .iter()
                .filter_map(|(ino, p)| {
                    // `join("")` would add a trailing slash: a file is not a directory.
                    let rest = p.strip_prefix(&from).ok()?;
                    Some((*ino, if rest.as_os_str().is_empty() { to.clone() } else { to.join(rest) }))
                })
                .collect();
            for (ino, path) in moved {
                if let Some(old) = state.paths.insert(ino, path.clone()) {
                    state.inos.remove(&old);
                }
                state.inos.insert(path, ino);
            }
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        let mut state = self.state();
        let result = (|| {
            if flags & libc::O_ACCMODE != libc::O_RDONLY {
                state.live()?;
            }
            let file = state.open_file(ino, flags)?;
            let fh = state.next_fh;
            state.next_fh += 1;
            state.handles.insert(fh, (ino, file));
            Ok(fh)
        })();
        match result {
            Ok(fh) => reply.opened(fh, 0),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut state = self.state();
        let result = (|| {
            state.live()?;
            let relative = state.child(parent, name)?;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(flags & libc::O_TRUNC != 0)
                .mode(mode & !umask)
                .open(state.backing.join(&relative))
                .map_err(errno)?;
            let ino = state.ino_of(relative);
            let attr = state.attr(ino)?;
            let fh = state.next_fh;
            state.next_fh += 1;
            state.handles.insert(fh, (ino, file));
            Ok((attr, fh))
        })();
        match result {
            Ok((attr, fh)) => reply.created(&TTL, &attr, 0, fh, 0),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let state = self.state();
        let result = (|| {
            let mut buf = vec![0; size as usize];
            let read = match state.handles.get(&fh) {
                Some((_, file)) => read_at_most(file, &mut buf, offset as u64),
                None => read_at_most(&state.open_file(ino, libc::O_RDONLY)?, &mut buf, offset as u64),
            }
            .map_err(errno)?;
            buf.truncate(read);
            Ok(buf)
        })();
        match result {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let mut state = self.state();
        let result = (|| {
            state.live()?;
            // Pages written back from a mapping may name a handle already released.
            let file = match state.handles.get(&fh) {
                Some((_, file)) => file.try_clone().map_err(errno)?,
                None => state.open_file(ino, libc::O_RDWR)?,
            };
            state.remember(ino, &file, offset as u64, data.len() as u64)?;
            file.write_all_at(data, offset as u64).map_err(errno)?;
            Ok(data.len() as u32)
        })();
        match result {
            Ok(written) => reply.written(written),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock_owner: u64, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.state().handles.remove(&fh);
        reply.ok();
    }

    /// What an fsync promises, and all the tests need: this file's contents
    /// survive the next cut. (The backing files themselves are never synced:
    /// the machine running the tests does not lose power.)
    fn fsync(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        let mut state = self.state();
        match state.live() {
            Ok(()) => {
                state.unsynced.remove(&ino);
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&mut self, _req: &Request<'_>, _ino: u64, _flags: i32, reply: ReplyOpen) {
        reply.opened(0, 0);
    }

    fn readdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, offset: i64, mut reply: ReplyDirectory) {
        let mut state = self.state();
        let result = (|| {
            let relative = state.paths.get(&ino).cloned().ok_or(ENOENT)?;
            let mut entries = vec![(ino, FileType::Directory, ".".into()), (ino, FileType::Directory, "..".into())];
            for entry in std::fs::read_dir(state.backing.join(&relative)).map_err(errno)? {
                let entry = entry.map_err(errno)?;
                let kind = match entry.file_type().map_err(errno)? {
                    t if t.is_dir() => FileType::Directory,
                    t if t.is_symlink() => FileType::Symlink,
                    _ => FileType::RegularFile,
                };
                let child = state.ino_of(relative.join(entry.file_name()));
                entries.push((child, kind, entry.file_name()));
            }
            Ok(entries)
        })();
        match result {
            Ok(entries) => {
                for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset.max(0) as usize) {
                    if reply.add(ino, (i + 1) as i64, kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        match self.state().live() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        let backing = self.state().backing.clone();
        match nix_statvfs(&backing) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn access(&mut self, _req: &Request<'_>, ino: u64, _mask: i32, reply: ReplyEmpty) {
        match self.state().path(ino) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn nix_statvfs(path: &Path) -> io::Result<libc::statvfs> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut out = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is a valid NUL-terminated string and `out` points to
    // writable memory of the right size; statvfs initialises it on success.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), out.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `out`.
    #[allow(unsafe_code)]
    Ok(unsafe { out.assume_init() })
}
