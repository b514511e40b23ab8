//! Values made from files (a credential, a CA bundle's TLS config) kept
//! between requests and made again when the file changes. Files are looked
//! at off the async runtime, at most once a [`REVALIDATE`] per file, so a
//! rotated secret or CA applies within that time and no request waits on disk.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// How long a value is used before its file is looked at again.
pub const REVALIDATE: Duration = Duration::from_secs(1);

/// What identifies one version of a file: a rewrite, a rename over it or a
/// chmod/chown changes one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
        }
    }
}

struct Entry<T> {
    stamp: Option<Stamp>,
    checked: Instant,
    value: Result<Arc<T>, String>,
}

/// Makes a value from a file and its metadata; the error names the file.
pub type Load<T> = fn(&Path, &std::fs::Metadata) -> Result<T, String>;

/// Values by file path.
pub struct FileCache<T> {
    entries: Arc<Mutex<HashMap<PathBuf, Entry<T>>>>,
    load: Load<T>,
    /// What the files are, for errors ("secret file", "CA file").
    what: &'static str,
}

impl<T: Send + Sync + 'static> FileCache<T> {
    /// A cache of `what` files that makes values with `load`.
    pub fn new(what: &'static str, load: Load<T>) -> Self {
        Self { entries: Arc::default(), load, what }
    }

    /// The value for `path`, made again if the file changed since it was made.
    pub async fn get(&self, path: &Path) -> Result<Arc<T>, String> {
        {
            let entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(entry) = entries.get(path)
                && entry.checked.elapsed() < REVALIDATE
            {
                return entry.value.clone();
            }
        }
        let (entries, load, what, path) = (self.entries.clone(), self.load, self.what, path.to_owned());
        tokio::task::spawn_blocking(move || {
            let meta = std::fs::metadata(&path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()));
            let stamp = meta.as_ref().ok().map(Stamp::of);
            {
                let mut entries = entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                // The same file as last time, made into a value then: keep it.
                // A failed load is tried again: its cause may have passed.
                if let Some(entry) = entries.get_mut(&path)
                    && stamp.is_some()
                    && entry.stamp == stamp
                    && entry.value.is_ok()
                {
                    entry.checked = Instant::now();
                    return entry.value.clone();
                }
            }
            // Made outside the lock: requests with a fresh value never wait on a slow load.
            let value = meta.and_then(|meta| load(&path, &meta)).map(Arc::new);
            let mut entries = entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            entries.insert(path, Entry { stamp, checked: Instant::now(), value: value.clone() });
            value
        })
        .await
        .map_err(|e| format!("file check failed: {e}"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn length(path: &Path, _: &std::fs::Metadata) -> Result<usize, String> {
        std::fs::read(path).map(|bytes| bytes.len()).map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn a_changed_file_is_read_again_after_the_revalidation_time() {
        let dir = std::env::temp_dir().join(format!("tollgate-file-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("secret");
        std::fs::write(&path, "abc").expect("write");
        let cache = FileCache::new("test file", length);
        assert_eq!(cache.get(&path).await.as_deref(), Ok(&3));
        std::fs::write(&path, "abcdef").expect("rewrite");
        tokio::time::sleep(REVALIDATE + Duration::from_millis(50)).await;
        assert_eq!(cache.get(&path).await.as_deref(), Ok(&6));
        std::fs::remove_file(&path).expect("remove");
        tokio::time::sleep(REVALIDATE + Duration::from_millis(50)).await;
        assert!(cache.get(&path).await.is_err(), "a removed file fails closed");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
