//! Where read commands get their answers: the daemon, over its socket, or,
//! when no daemon answers, the session log itself, opened read-only (found
//! through the configuration), so reviewers can read a stopped host.

use std::path::PathBuf;

use anyhow::Context;

use crate::{
    config::{Config, DEFAULT_CONFIG_PATH},
    policy::PolicySet,
    store::Reader,
};

/// The daemon's socket, or the session log of a host whose daemon is stopped.
pub enum Source {
    /// A daemon answers here.
    Daemon(PathBuf),
    /// No daemon: read the store directly.
    Local(Box<Local>),
}

/// A stopped host's configuration and its session log.
pub struct Local {
    /// The configuration that names the store and the policies.
    pub config: Config,
    /// Read-only access to the session log.
    pub reader: Reader,
}

impl Local {
    /// The policies the configuration names.
    pub fn policies(&self) -> anyhow::Result<PolicySet> {
        Ok(PolicySet::load(&self.config.policies)?)
    }
}

/// `config`, else `/etc/tollgate/config.yaml`, else the built-in defaults.
pub fn config(config: Option<PathBuf>) -> anyhow::Result<Config> {
    Ok(match config {
        Some(path) => Config::load(&path)?,
        None => {
            let default = PathBuf::from(DEFAULT_CONFIG_PATH);
            if default.exists() { Config::load(&default)? } else { Config::embedded() }
        }
    })
}

/// The session log itself, read-only (whether or not a daemon runs).
pub fn store(config: &Config) -> anyhow::Result<Reader> {
    let database = config.database_path();
    std::fs::metadata(&database).with_context(|| format!("no session log at {}", database.display()))?;
    Ok(Reader::new(&database))
}

/// The daemon if one answers at the socket, else the store of `config`
/// (default `/etc/tollgate/config.yaml`, else the built-in defaults).
pub fn source(socket: Option<PathBuf>, config: Option<PathBuf>) -> anyhow::Result<Source> {
    let config = self::config(config)?;
    let socket = socket.unwrap_or_else(|| config.socket.clone());
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        return Ok(Source::Daemon(socket));
    }
    let database = config.database_path();
    if let Err(e) = std::fs::metadata(&database) {
        let unreachable = crate::api::client::Unreachable { path: socket.display().to_string(), source: e };
        return Err(anyhow::Error::new(unreachable)
            .context(format!("and there is no session log at {} to read instead", database.display())));
    }
    eprintln!("tollgate: no daemon at {}; reading {} read-only", socket.display(), database.display());
    let reader = Reader::new(&database);
    Ok(Source::Local(Box::new(Local { config, reader })))
}
