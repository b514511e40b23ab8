//! SIGHUP: read the configuration and its policies again. A reload that
//! fails anywhere keeps everything as it was and says why in one line (as
//! nginx does); one that loads puts the new policies, issuers and reviewers
//! in force for new sessions and requests.

use std::{path::Path, sync::Arc};

use anyhow::Context;

use crate::{
    approval::Reviews,
    config::Config,
    identity::{Verifier, dev},
    policy::PolicySet,
    session::Sessions,
};

/// Settings a reload cannot change (they need a restart), by name, where they changed.
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut check = |name, differs: bool| {
        if differs {
            changed.push(name);
        }
    };
    check("state_dir", old.state_dir != new.state_dir);
    check("socket", old.socket != new.socket);
    check("cgroup", old.cgroup != new.cgroup);
    check("proxy_port", old.proxy_port != new.proxy_port);
    check("event_buffer_kib", old.event_buffer_kib != new.event_buffer_kib);
    check("report_listen", old.report_listen != new.report_listen);
    check("otlp_endpoint", old.otlp_endpoint != new.otlp_endpoint);
    check("retention", old.retention != new.retention);
    check("log_format", old.log_format != new.log_format);
    changed
}

/// Loads what a reload puts in force, all or nothing (blocking).
fn load(path: &Path) -> anyhow::Result<(Config, PolicySet, Verifier)> {
    let config = Config::load(path).with_context(|| format!("configuration {}", path.display()))?;
    let policies = PolicySet::load(&config.policies).context("policies")?;
    let dev_jwks = if config.dev_issuer {
        let key = dev::ensure_key(&Config::dev_key_path(&config.state_dir))?;
        Some(dev::jwks(&key)?)
    } else {
        None
    };
    let verifier = Verifier::new(&config.issuers, dev_jwks);
    Ok((config, policies, verifier))
}

/// Reloads from `path`; `running` is the configuration the daemon started with.
pub async fn reload(running: &Config, path: &Path, sessions: &Arc<Sessions>, reviews: &Arc<Reviews>) {
    let owned = path.to_owned();
    let loaded = tokio::task::spawn_blocking(move || load(&owned)).await;
    let (config, policies, verifier) = match loaded {
        Ok(Ok(loaded)) => loaded,
        Ok(Err(e)) => {
            tracing::error!("reload failed, keeping the loaded configuration and policies: {e:#}");
            return;
        }
        Err(e) => {
            tracing::error!("reload failed, keeping the loaded configuration and policies: {e}");
            return;
        }
    };
    let restart = needs_restart(running, &config);
    if !restart.is_empty() {
        tracing::warn!(settings = ?restart, "these settings changed and take effect only after a restart");
    }
    let files: Vec<String> = policies.files.iter().map(|f| f.display().to_string()).collect();
    sessions.reload(policies, verifier).await;
    reviews.set_reviewers(config.reviewers.clone());
    tracing::info!(files = ?files, "reloaded: new sessions get the new policies; live sessions keep theirs but lose removed grants");
}
