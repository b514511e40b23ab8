//! The daemon's heartbeat: a file in the state directory holding the last
//! time it was alive, so the next daemon can say when none ran.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use crate::store::rfc3339;

const FILE: &str = "heartbeat";
const INTERVAL: Duration = Duration::from_secs(1);

/// When the last daemon was alive, if one left a heartbeat.
pub fn last(state_dir: &Path) -> Option<String> {
    std::fs::read_to_string(state_dir.join(FILE)).ok().map(|text| text.trim().to_owned()).filter(|t| !t.is_empty())
}

/// Writes the heartbeat every second for as long as the daemon runs.
pub async fn beat(state_dir: PathBuf) -> anyhow::Result<()> {
    let path = state_dir.join(FILE);
    let mut tick = tokio::time::interval(INTERVAL);
    loop {
        tick.tick().await;
        if let Err(e) = tokio::fs::write(&path, rfc3339(SystemTime::now())).await {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the heartbeat");
        }
    }
}

/// A handover: the heartbeat's last beat says when this daemon stopped.
pub fn stop(state_dir: &Path) {
    let _ = std::fs::write(state_dir.join(FILE), rfc3339(SystemTime::now()));
}

/// A clean stop leaves nothing for a next daemon to account for.
pub fn remove(state_dir: &Path) {
    let _ = std::fs::remove_file(state_dir.join(FILE));
}
