//! Where archive objects live: a local directory by default, or an
//! S3-compatible or Azure Blob object store (through the `object_store`
//! crate). The interface is an object store's: put whole objects (atomic on
//! every backend), get, list by prefix.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// An S3-compatible or Azure Blob store, addressed as `s3://bucket/prefix`
/// or `az://container/prefix`. Credentials and endpoints come from the
/// usual environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_REGION`, `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`; `AZURE_STORAGE_ACCOUNT_NAME`,
/// `AZURE_STORAGE_ACCOUNT_KEY`, `AZURE_STORAGE_USE_EMULATOR`, ...).
///
/// Calls run on the store's own runtime and the caller waits on a channel,
/// so it works from plain threads and from inside async code alike.
#[derive(Debug)]
pub struct ObjectArchive {
    store: Arc<dyn object_store::ObjectStore>,
    prefix: String,
    url: String,
    rt: tokio::runtime::Runtime,
}

impl ObjectArchive {
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let fail = |e: &dyn std::fmt::Display| StoreError(format!("archive.url {url:?}: {e}"));
        let (scheme, rest) =
            url.split_once("://").ok_or_else(|| fail(&"expected s3://bucket/prefix or az://container/prefix"))?;
        let (container, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let store: Arc<dyn object_store::ObjectStore> = match scheme {
            "s3" => Arc::new(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(container)
                    .build()
                    .map_err(|e| fail(&e))?,
            ),
            "az" | "azure" => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_container_name(container)
                    .build()
                    .map_err(|e| fail(&e))?,
            ),
            other => return Err(fail(&format!("unsupported scheme {other:?} (s3 or az)"))),
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("archive-io")
            .enable_all()
            .build()
            .map_err(|e| fail(&e))?;
        Ok(Self {
            store,
            prefix: prefix.trim_end_matches('/').to_string(),
            url: url.trim_end_matches('/').to_string(),
            rt,
        })
    }

    fn path(&self, name: &str) -> object_store::path::Path {
        if self.prefix.is_empty() {
            object_store::path::Path::from(name)
        } else {
            object_store::path::Path::from(format!("{}/{name}", self.prefix))
        }
    }

    /// Runs `fut` on the store's runtime and waits for it on this thread.
    fn run<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = Result<T, object_store::Error>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| StoreError("the archive I/O runtime stopped".into()))?
            .map_err(|e| StoreError(e.to_string()))
    }
}

impl ArchiveStore for ObjectArchive {
    fn put(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        use object_store::ObjectStoreExt;
        let (store, path, payload) =
            (self.store.clone(), self.path(name), object_store::PutPayload::from(bytes.to_vec()));
        self.run(async move { store.put(&path, payload).await.map(|_| ()) })
    }

    fn get(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        use object_store::ObjectStoreExt;
        let (store, path) = (self.store.clone(), self.path(name));
        self.run(async move { Ok(store.get(&path).await?.bytes().await?.to_vec()) })
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        use futures_util::StreamExt;
        let store = self.store.clone();
        let root = (!self.prefix.is_empty()).then(|| object_store::path::Path::from(self.prefix.as_str()));
        let strip = if self.prefix.is_empty() { String::new() } else { format!("{}/", self.prefix) };
        let mut names: Vec<String> = self.run(async move {
            let mut out = Vec::new();
            let mut stream = store.list(root.as_ref());
            while let Some(meta) = stream.next().await {
                out.push(meta?.location.to_string());
            }
            Ok(out)
        })?;
        names = names
            .into_iter()
            .filter_map(|n| n.strip_prefix(&strip).map(str::to_string))
            .filter(|n| n.starts_with(prefix))
            .collect();
        names.sort();
        Ok(names)
    }

    fn locate(&self, name: &str) -> String {
        format!("{}/{name}", self.url)
    }
}

/// Opens the archive configured: `archive.url` if set, else the local directory.
pub fn open(url: Option<&str>, path: &Path) -> Result<Arc<dyn ArchiveStore>, StoreError> {
    match url {
        Some(u) => Ok(Arc::new(ObjectArchive::open(u)?)),
        None => Ok(Arc::new(LocalStore::open(path)?)),
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
