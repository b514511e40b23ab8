//! Hears the moment a session's cgroup empties: cgroup v2 raises an inotify
//! modify on `cgroup.events` when `populated` changes. So a finished
//! command's session ends (and its `run` returns) in milliseconds, not at
//! the next reap tick, which stays as the fallback.

use std::{
    collections::HashMap,
    os::fd::{AsFd, AsRawFd, RawFd},
    path::Path,
    sync::Mutex,
};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;

/// An inotify instance watching sessions' `cgroup.events`.
pub struct EmptiedWatch {
    inotify: AsyncFd<InotifyFd>,
    /// Which session cgroup each watch is on.
    cgroups: Mutex<HashMap<WatchDescriptor, u64>>,
}

/// `AsyncFd` wants `AsRawFd`, which nix's `Inotify` leaves out.
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl EmptiedWatch {
    /// A new instance; needs a running tokio runtime.
    pub fn new() -> std::io::Result<Self> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        // SAFETY: the AsyncFd owns the inotify fd, so the fd stays open while registered.
        let inotify = unsafe { AsyncFd::register(InotifyFd(inotify)) }?;
        Ok(Self { inotify, cgroups: Mutex::default() })
    }

    /// Watches the session cgroup at `cgroup` (id `cgroup_id`). The watch goes
    /// with the cgroup's directory.
    pub fn watch(&self, cgroup: &Path, cgroup_id: u64) -> nix::Result<()> {
        let wd = self.inotify.get_ref().0.add_watch(&cgroup.join("cgroup.events"), AddWatchFlags::IN_MODIFY)?;
        self.cgroups().insert(wd, cgroup_id);
        Ok(())
    }

    /// Waits until some watched cgroups' `cgroup.events` changed; returns
    /// their ids (they may have emptied, or filled).
    pub async fn changed(&self) -> std::io::Result<Vec<u64>> {
        loop {
            let mut guard = self.inotify.readable().await?;
            match guard.get_inner().0.read_events() {
                Ok(events) => {
                    let mut cgroups = self.cgroups();
                    let mut changed = Vec::new();
                    for event in events {
                        if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                            // The cgroup is gone, and its watch with it.
                            cgroups.remove(&event.wd);
                        } else if let Some(&cgroup_id) = cgroups.get(&event.wd)
                            && !changed.contains(&cgroup_id)
                        {
                            changed.push(cgroup_id);
                        }
                    }
                    if !changed.is_empty() {
                        return Ok(changed);
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn cgroups(&self) -> std::sync::MutexGuard<'_, HashMap<WatchDescriptor, u64>> {
        self.cgroups.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::super::cgroup;
    use super::*;

    /// A cgroup whose only process exits is reported once it is empty.
    #[tokio::test]
    async fn a_cgroup_is_reported_when_its_last_process_exits() {
        let mount = cgroup::cgroup2_mount().expect("cgroup v2 is mounted");
        let (path, _) = cgroup::create_session(&mount, &format!("tollgate-emptied-test-{}", std::process::id()))
            .expect("a scratch cgroup (tests run as root)");
        let watch = EmptiedWatch::new().expect("inotify");
        watch.watch(&path, 7).expect("a watch on cgroup.events");
        let mut child = std::process::Command::new("sleep").arg("0.2").spawn().expect("sleep");
        cgroup::move_process(&path, child.id()).expect("moved into the cgroup");
        assert!(cgroup::populated(&path));
        let mut reported = Vec::new();
        while cgroup::populated(&path) || reported.is_empty() {
            let changed = tokio::time::timeout(std::time::Duration::from_secs(5), watch.changed())
                .await
                .expect("a change within 5 s");
            reported.extend(changed.expect("inotify events"));
        }
        child.wait().expect("sleep reaped");
        assert!(reported.iter().all(|&id| id == 7), "only the watched cgroup: {reported:?}");
        assert!(!cgroup::populated(&path));
        std::fs::remove_dir(&path).expect("the scratch cgroup removed");
    }
}
