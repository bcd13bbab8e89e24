//! Where archive objects live. A local directory by default; the interface
//! is an object store's (put whole objects, get, list by prefix), so cloud
//! object stores fit behind it.

use std::io::Write;
use std::path::{Path, PathBuf};

/// An object store for archive segments and manifests.
pub trait ArchiveStore: Send + Sync + std::fmt::Debug {
    /// Writes a whole object atomically: readers see all of it or none.
    fn put(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError>;
    fn get(&self, name: &str) -> Result<Vec<u8>, StoreError>;
    /// Names under `prefix`, sorted.
    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;
    /// Where an object is, for messages (a path or a URL).
    fn locate(&self, name: &str) -> String;
}

/// A local directory.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(root).map_err(|e| StoreError(format!("cannot create {}: {e}", root.display())))?;
        Ok(Self { root: root.to_path_buf() })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

impl ArchiveStore for LocalStore {
    fn put(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.path(name);
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| StoreError(format!("cannot create {}: {e}", dir.display())))?;
        let tmp = path.with_extension("part");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&dir)?.sync_all()
        };
        write().map_err(|e| StoreError(format!("cannot write {}: {e}", path.display())))
    }

    fn get(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.path(name);
        std::fs::read(&path).map_err(|e| StoreError(format!("cannot read {}: {e}", path.display())))
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        let mut dirs = vec![self.root.clone()];
        while let Some(dir) = dirs.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError(format!("cannot list {}: {e}", dir.display()))),
            };
            for entry in entries {
                let entry = entry.map_err(|e| StoreError(format!("cannot list {}: {e}", dir.display())))?;
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                } else if let Ok(rel) = path.strip_prefix(&self.root) {
                    let name = rel.to_string_lossy().replace('\\', "/");
                    if name.starts_with(prefix) && !name.ends_with(".part") {
                        out.push(name);
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn locate(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

/// An object store failure.
#[derive(Debug, Clone, thiserror::Error)]
#[error("archive store: {0}")]
pub struct StoreError(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_round_trip_and_list_by_prefix_without_partial_writes() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        s.put("p0001/a.seg", b"one").unwrap();
        s.put("p0002/b.json", b"two").unwrap();
        std::fs::write(dir.path().join("p0001/c.part"), b"half").unwrap();
        assert_eq!(s.get("p0001/a.seg").unwrap(), b"one");
        assert_eq!(s.list("").unwrap(), ["p0001/a.seg", "p0002/b.json"]);
        assert_eq!(s.list("p0002/").unwrap(), ["p0002/b.json"]);
    }
}
