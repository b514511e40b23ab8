//! Command-line interface: argument definitions and dispatch. Each command's
//! work lives in the module for its concern; this file only wires them.

mod local;
mod output;
mod replay;
mod run;

use local::Source;

use crate::report::window;

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use crate::{
    api::{
        client,
        protocol::{Request, Response},
    },
    config::{Config, DEFAULT_CONFIG_PATH, DEFAULT_SOCKET},
    identity::dev,
    store::rfc3339,
};

/// Exit code when a token is refused (and the command was not started).
pub const EXIT_TOKEN_REFUSED: i32 = 2;
/// Exit code for a command line tollgate cannot parse.
pub const EXIT_USAGE: i32 = 64;
/// Exit code when no daemon answers on the control socket.
pub const EXIT_DAEMON_UNREACHABLE: i32 = 69;
/// Exit code of `tollgate run` when policy ended the session (revoked, expired, --ttl).
pub const EXIT_ENDED_BY_POLICY: i32 = 77;

#[derive(Debug, Parser)]
#[command(name = "tollgate", version, about = "Verified identities and kernel enforcement for nested agents")]
struct Cli {
    /// The daemon's control socket, before the command: kept for scripts, refused for
    /// commands that do not talk to the daemon, and shown only on those that do.
    #[arg(long, value_name = "PATH", hide = true)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// How commands that talk to the daemon find it.
#[derive(Debug, Clone, Default, clap::Args)]
struct Connection {
    /// The daemon's control socket [default: $TOLLGATE_SOCKET, else the socket of /etc/tollgate/config.yaml, else /run/tollgate/control.sock]
    #[arg(long, env = "TOLLGATE_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
enum Format {
    /// For people.
    #[default]
    Text,
    /// For programs.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon in the foreground (as root).
    Daemon {
        /// Where to listen [default: the configuration's `socket`]
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Configuration file [default: /etc/tollgate/config.yaml; without it the daemon refuses to start]
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Override the config's state_dir.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Run a command in a new governed session under a token; inside a
    /// session, in a child session with at most the parent's rights.
    Run {
        #[command(flatten)]
        conn: Connection,
        /// File holding the OIDC JWT.
        #[arg(long, value_name = "FILE", required_unless_present = "grants")]
        token_file: Option<PathBuf>,
        /// Inside a session, instead of a token: only this grant of the parent (repeatable).
        #[arg(long = "grant", value_name = "NAME", conflicts_with = "token_file")]
        grants: Vec<String>,
        /// Why the session runs (recorded; required by identities with require_reason).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        /// End the session after this long (e.g. 10m).
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// List sessions.
    Sessions {
        #[command(flatten)]
        conn: Connection,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
        /// Only sessions started this long ago (2h) or since this date.
        #[arg(long, value_name = "DURATION|DATE")]
        since: Option<String>,
        /// Only this identity's sessions.
        #[arg(long, value_name = "NAME")]
        identity: Option<String>,
        /// Only running or only ended sessions.
        #[arg(long, value_enum)]
        state: Option<SessionState>,
        /// With no daemon running: the config naming the session log [default: /etc/tollgate/config.yaml]
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Show one session: its process tree and its events in order.
    Show {
        #[command(flatten)]
        conn: Connection,
        /// The session id.
        session: String,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
        /// With no daemon running: the config naming the session log.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Replay a session (and its child sessions) as it happened.
    Replay {
        #[command(flatten)]
        conn: Connection,
        /// The session id.
        session: String,
        /// Play N times as fast as it happened.
        #[arg(long, value_name = "N", conflicts_with = "instant", default_value_t = 1.0)]
        speed: f64,
        /// Print everything at once.
        #[arg(long)]
        instant: bool,
        /// Only these kinds of records: exec, network, http, approval, output (comma-separated).
        #[arg(long, value_name = "KINDS", value_delimiter = ',')]
        only: Vec<String>,
        #[arg(long, value_enum, default_value_t)]
        format: ReplayFormat,
        /// With no daemon running: the config naming the session log.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Check that the session log was not edited: recompute its hash chain and signatures.
    Verify {
        #[command(flatten)]
        conn: Connection,
        /// Only this session's records.
        session: Option<String>,
        /// Only records from this long ago (30d) or this date on.
        #[arg(long, value_name = "DURATION|DATE")]
        since: Option<String>,
        /// A report (JSON) to check offline instead, with --key.
        #[arg(long, value_name = "FILE", requires = "key")]
        report: Option<PathBuf>,
        /// The host's public key (a file holding `ed25519:...`, as `status` shows it).
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
        /// With no daemon running: the config naming the session log.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// This host's report for a period: sessions, chains, use, denials, held requests, findings (reviewers).
    Report {
        #[command(flatten)]
        conn: Connection,
        /// Period start: a duration back from now (7d) or a date.
        #[arg(long, value_name = "DURATION|DATE", default_value = "7d")]
        since: String,
        /// Period end [default: now]
        #[arg(long, value_name = "DURATION|DATE")]
        until: Option<String>,
        /// Only this identity.
        #[arg(long, value_name = "NAME")]
        identity: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        format: ReportFormat,
        /// Write it here instead of standard output.
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<PathBuf>,
        /// Pull from these hosts' report listeners (https://HOST:PORT) and merge, instead of this host.
        #[arg(long = "from", value_name = "URL")]
        from: Vec<String>,
        /// With --from: the bearer token (a JWT that reviewers.jwt admits on each host).
        #[arg(long, value_name = "FILE", requires = "from")]
        token_file: Option<PathBuf>,
        /// With --from: trust this CA (PEM) for the hosts' certificates.
        #[arg(long, value_name = "FILE", requires = "from")]
        ca: Option<PathBuf>,
        /// With --from: accept only reports signed by these host keys (files with `ed25519:...`).
        #[arg(long = "key", value_name = "FILE", requires = "from")]
        keys: Vec<PathBuf>,
        /// With no daemon running: the config naming the session log.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Show the daemon's state.
    Status {
        #[command(flatten)]
        conn: Connection,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Requests held for approval (reviewers only).
    Approvals {
        #[command(flatten)]
        conn: Connection,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
        /// Keep watching: print each new held request as it comes.
        #[arg(long)]
        watch: bool,
    },
    /// Open approval windows (`approve --for`), and closing them (reviewers).
    #[command(args_conflicts_with_subcommands = true)]
    Windows {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        action: Option<WindowsCommand>,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Approve a held request.
    Approve {
        #[command(flatten)]
        conn: Connection,
        /// The approval id (from `tollgate approvals`).
        id: String,
        /// Also let matching requests of that session through for this long (e.g. 10m).
        #[arg(long = "for", value_name = "DURATION", value_parser = humantime::parse_duration)]
        window: Option<std::time::Duration>,
    },
    /// Deny a held request.
    Deny {
        #[command(flatten)]
        conn: Connection,
        /// The approval id.
        id: String,
        /// Why; the requester sees it.
        #[arg(long)]
        reason: Option<String>,
    },
    /// End a live session now: its processes are killed, and who and why are recorded (reviewers).
    Revoke {
        #[command(flatten)]
        conn: Connection,
        /// The session id.
        session: String,
        /// Why, for the record.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Every record of the session log as JSON lines, in the order written (for log shippers; root).
    Export {
        /// Only records from this long ago (7d) or this date on.
        #[arg(long, value_name = "DURATION|DATE")]
        since: Option<String>,
        /// Keep going: print records as they are written.
        #[arg(long)]
        follow: bool,
        #[arg(long, value_enum, default_value_t)]
        format: ExportFormat,
        /// The config naming the session log [default: /etc/tollgate/config.yaml]
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Every grant: its identity, state, rules, last use and expiry (reviewers).
    #[command(args_conflicts_with_subcommands = true)]
    Grants {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        action: Option<GrantsCommand>,
        /// Count uses from this long ago (30d) or this date (2026-01-31).
        #[arg(long, value_name = "DURATION|DATE", default_value = "30d")]
        since: String,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Access review: stale and over-privileged delegations, idle identities, repeated denials (reviewers).
    Review {
        #[command(flatten)]
        conn: Connection,
        /// Window start: a duration back from now (90d) or a date (2026-01-31).
        #[arg(long, value_name = "DURATION|DATE", default_value = "30d")]
        since: String,
        /// Window end: a duration back from now or a date [default: now]
        #[arg(long, value_name = "DURATION|DATE")]
        until: Option<String>,
        /// Only this identity.
        #[arg(long, value_name = "NAME")]
        identity: Option<String>,
        /// Only sessions whose token had this claim (e.g. groups=ci).
        #[arg(long, value_name = "NAME=VALUE")]
        claim: Option<String>,
        /// Only findings about exec, network or http.
        #[arg(long, value_name = "exec|network|http")]
        resource: Option<String>,
        /// Print a narrowed policy (YAML) from what was exercised instead of findings.
        #[arg(long)]
        suggest: bool,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
        /// With no daemon running: the config naming the session log and the policies.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Dev issuer tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Shell completions and man pages, for packages.
    #[command(hide = true)]
    Generate {
        /// Where to write `completions/` and `man/`.
        dir: PathBuf,
    },
    /// Policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Mint a dev-issuer token (trusted only where the config says dev_issuer: true).
    Mint {
        /// The token's subject.
        #[arg(long)]
        sub: String,
        /// An extra claim NAME=VALUE; repeat a name to make an array claim.
        #[arg(long = "claim", value_name = "NAME=VALUE")]
        claims: Vec<String>,
        /// Seconds until the token expires (negative for an expired token).
        #[arg(long, default_value_t = 3600, allow_negative_numbers = true)]
        expires_in: i64,
        /// The daemon's state directory (holds the dev key).
        #[arg(long, value_name = "DIR", conflicts_with = "config")]
        state_dir: Option<PathBuf>,
        /// Take the state directory from this config file.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SessionState {
    /// Still running.
    Running,
    /// Ended.
    Ended,
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
enum ReplayFormat {
    /// Lines for people, paced like the session.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
    /// asciicast v2 of the terminal output (asciinema plays it).
    Asciicast,
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
enum ExportFormat {
    /// One JSON object per line: the ledger place (n, hash) and its record.
    #[default]
    Jsonl,
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
enum ReportFormat {
    /// Markdown.
    #[default]
    Md,
    /// JSON (signed; `tollgate verify --report` checks it).
    Json,
    /// One self-contained HTML page.
    Html,
}

#[derive(Debug, Subcommand)]
enum WindowsCommand {
    /// Close a window now: matching requests are held again.
    Revoke {
        #[command(flatten)]
        conn: Connection,
        /// The window's id (from `tollgate windows`).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum GrantsCommand {
    /// Honour an expired or revoked grant again, and restart its unused clock.
    Renew {
        #[command(flatten)]
        conn: Connection,
        /// The grant.
        name: String,
    },
    /// Stop honouring a grant: new sessions lose it, live sessions at once.
    Revoke {
        #[command(flatten)]
        conn: Connection,
        /// The grant.
        name: String,
        /// Why, for the record.
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Check policy files; errors are printed as FILE:LINE:COLUMN: message.
    Check {
        /// Files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// What the kernel would decide for an identity connecting to ADDR:PORT, and the entry that decides.
    Explain {
        #[command(flatten)]
        conn: Connection,
        /// The policy identity.
        #[arg(long)]
        identity: String,
        /// The destination: 10.1.2.3:443, [::1]:80, or a name (github.com:443, answered for each address it has now).
        #[arg(long, value_name = "ADDR:PORT|HOST:PORT", required_unless_present = "exec", conflicts_with = "exec")]
        to: Option<String>,
        /// An executable instead: may the identity's sessions run it?
        #[arg(long, value_name = "PATH")]
        exec: Option<PathBuf>,
        /// A SQL statement: what the postgres route of --to does with it.
        #[arg(long, value_name = "STATEMENT", requires = "to")]
        sql: Option<String>,
        /// Policy files or directories to ask instead of the running daemon.
        #[arg(long = "policy", value_name = "PATH")]
        policies: Vec<PathBuf>,
        /// With no daemon running: take the policies from this config file.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

impl Command {
    /// How the command reaches the daemon, if it talks to one.
    fn connection(&self) -> Option<&Connection> {
        let conn = match self {
            Self::Run { conn, .. }
            | Self::Sessions { conn, .. }
            | Self::Show { conn, .. }
            | Self::Replay { conn, .. }
            | Self::Verify { conn, .. }
            | Self::Report { conn, .. }
            | Self::Status { conn, .. }
            | Self::Approvals { conn, .. }
            | Self::Approve { conn, .. }
            | Self::Deny { conn, .. }
            | Self::Revoke { conn, .. }
            | Self::Review { conn, .. }
            | Self::Grants { action: None, conn, .. }
            | Self::Windows { action: None, conn, .. }
            | Self::Grants {
                action: Some(GrantsCommand::Renew { conn, .. } | GrantsCommand::Revoke { conn, .. }),
                ..
            }
            | Self::Windows { action: Some(WindowsCommand::Revoke { conn, .. }), .. }
            | Self::Policy(PolicyCommand::Explain { conn, .. }) => conn,
            Self::Daemon { .. }
            | Self::Generate { .. }
            | Self::Export { .. }
            | Self::Token(_)
            | Self::Policy(PolicyCommand::Check { .. }) => {
                return None;
            }
        };
        Some(conn)
    }

    /// The command's name as typed, for messages.
    fn name(&self) -> &'static str {
        match self {
            Self::Daemon { .. } => "daemon",
            Self::Generate { .. } => "generate",
            Self::Export { .. } => "export",
            Self::Token(_) => "token",
            Self::Policy(PolicyCommand::Check { .. }) => "policy check",
            _ => "this command",
        }
    }
}

/// Parses the command line, runs it, and returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { EXIT_USAGE } else { 0 };
        }
    };
    if !matches!(cli.command, Command::Daemon { .. }) {
        // Commands end quietly when their reader goes away (`tollgate sessions
        // | head -1`), and `tollgate run` hands the command the default
        // disposition, as a shell would, not the ignored one Rust starts with.
        // The daemon keeps ignoring SIGPIPE: a closed socket must not kill it.
        // SAFETY: setting a signal disposition before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tollgate: {}", describe(&e));
            if e.chain().any(|cause| cause.is::<client::Unreachable>()) { EXIT_DAEMON_UNREACHABLE } else { 1 }
        }
    }
}

/// The error and its causes on one line, skipping causes whose text the
/// message already includes.
fn describe(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// What to say when there is no configuration to go by.
fn no_config() -> String {
    format!(
        "no configuration: pass --config FILE (packaging/dev/config.yaml to try tollgate out) or create {DEFAULT_CONFIG_PATH}"
    )
}

/// The config at the default path, if there is one.
fn default_config() -> anyhow::Result<Option<Config>> {
    let path = PathBuf::from(DEFAULT_CONFIG_PATH);
    if !path.exists() {
        return Ok(None);
    }
    Ok(Some(Config::load(&path)?))
}

fn socket_path(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path);
    }
    Ok(default_config()?.map_or_else(|| PathBuf::from(DEFAULT_SOCKET), |c| c.socket))
}

fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    let connection = cli.command.connection();
    if cli.socket.is_some() && connection.is_none() {
        let what = cli.command.name();
        let hint = if what == "daemon" { ": give it after the command (tollgate daemon --socket PATH)" } else { "" };
        eprintln!("tollgate: --socket before the command is for commands that talk to the daemon, not `{what}`{hint}");
        return Ok(EXIT_USAGE);
    }
    let socket = cli.socket.clone().or_else(|| connection.and_then(|c| c.socket.clone()));
    match cli.command {
        Command::Daemon { config, state_dir, socket, .. } => {
            // Never a guess: no key, no policy, no state made up on the spot.
            let path = match config {
                Some(path) => path,
                None if PathBuf::from(DEFAULT_CONFIG_PATH).exists() => PathBuf::from(DEFAULT_CONFIG_PATH),
                None => anyhow::bail!(no_config()),
            };
            let mut config = Config::load(&path)?;
            if let Some(dir) = state_dir {
                config.state_dir = dir;
            }
            if let Some(socket) = socket.clone() {
                config.socket = socket;
            }
            init_logging(config.log_format);
            crate::memory::small_pages_only();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(crate::daemon::run(config, path))?;
            Ok(0)
        }
        Command::Run { token_file, grants, reason, ttl, command, .. } => {
            let authority = match token_file {
                Some(file) => run::Authority::TokenFile(file),
                None => run::Authority::Grants(grants),
            };
            run::run(&socket_path(socket.clone())?, run::Asked { authority, reason, ttl }, &command)
        }
        Command::Generate { dir, .. } => {
            generate(&dir)?;
            Ok(0)
        }
        Command::Export { since, follow, format: ExportFormat::Jsonl, config, .. } => {
            let reader = local::store(&local::config(config)?)?;
            let since = since.map(|s| window::bound(&s, std::time::SystemTime::now())).transpose()?;
            let mut after = 0;
            let mut stdout = std::io::stdout().lock();
            loop {
                let batch = reader.ledger_after(after, since.as_deref(), 1000)?;
                for entry in &batch {
                    use std::io::Write;
                    writeln!(stdout, "{entry}")?;
                    after = entry["n"].as_i64().unwrap_or(after);
                }
                if batch.is_empty() {
                    if !follow {
                        return Ok(0);
                    }
                    use std::io::Write;
                    stdout.flush()?;
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
            }
        }
        Command::Grants { action: None, since, format, .. } => {
            let now = std::time::SystemTime::now();
            let request = Request::Grants { since: window::bound(&since, now)?, until: rfc3339(now) };
            let grants = call(&socket_path(socket.clone())?, &request)?;
            output::grants(&grants, matches!(format, Format::Json))?;
            Ok(0)
        }
        Command::Grants { action: Some(GrantsCommand::Renew { name, .. }), .. } => {
            let answer = call(&socket_path(socket.clone())?, &Request::RenewGrant { grant: name })?;
            println!(
                "grant {} is {}",
                answer["grant"].as_str().unwrap_or("-"),
                answer["state"].as_str().unwrap_or("-")
            );
            Ok(0)
        }
        Command::Grants { action: Some(GrantsCommand::Revoke { name, reason, .. }), .. } => {
            let answer = call(&socket_path(socket.clone())?, &Request::RevokeGrant { grant: name, reason })?;
            println!(
                "grant {} is {}",
                answer["grant"].as_str().unwrap_or("-"),
                answer["state"].as_str().unwrap_or("-")
            );
            Ok(0)
        }
        Command::Review { since, until, identity, claim, resource, suggest, format, config, .. } => {
            let now = std::time::SystemTime::now();
            let claim = match claim {
                Some(pair) => {
                    let (name, value) =
                        pair.split_once('=').with_context(|| format!("--claim '{pair}' must be NAME=VALUE"))?;
                    Some((name.to_owned(), value.to_owned()))
                }
                None => None,
            };
            let query = crate::review::ReviewQuery {
                since: window::bound(&since, now)?,
                until: match until {
                    Some(until) => window::bound(&until, now)?,
                    None => rfc3339(now + std::time::Duration::from_secs(1)),
                },
                identity,
                claim,
                resource,
                suggest,
            };
            let review = match local::source(socket.clone(), config)? {
                Source::Daemon(socket) => call(&socket, &Request::Review(query))?,
                Source::Local(local) => {
                    let policies = local.policies()?;
                    let review = crate::review::run(
                        &policies,
                        |a, b| crate::session::grants::views_from_log(&policies, &local.reader, a, b),
                        &local.reader,
                        local.config.delegation.review_depth,
                        &query,
                    )?;
                    serde_json::to_value(review)?
                }
            };
            output::review(&review, suggest, matches!(format, Format::Json))?;
            Ok(0)
        }
        Command::Sessions { format, since, identity, state, config, .. } => {
            let sessions = match local::source(socket.clone(), config)? {
                Source::Daemon(socket) => call(&socket, &Request::Sessions)?,
                Source::Local(local) => serde_json::to_value(local.reader.sessions()?)?,
            };
            let since = since.map(|s| window::bound(&s, std::time::SystemTime::now())).transpose()?;
            let keep = |s: &serde_json::Value| {
                let started = s["started_at"].as_str().unwrap_or_default();
                since.as_deref().is_none_or(|since| started >= since)
                    && identity.as_deref().is_none_or(|i| s["identity"] == i)
                    && match state {
                        Some(SessionState::Running) => s["ended_at"].is_null(),
                        Some(SessionState::Ended) => !s["ended_at"].is_null(),
                        None => true,
                    }
            };
            let sessions = serde_json::Value::Array(
                sessions.as_array().into_iter().flatten().filter(|s| keep(s)).cloned().collect(),
            );
            output::sessions(&sessions, matches!(format, Format::Json))?;
            Ok(0)
        }
        Command::Show { session, format, config, .. } => {
            let detail = match local::source(socket.clone(), config)? {
                Source::Daemon(socket) => call(&socket, &Request::Show { session })?,
                Source::Local(local) => {
                    serde_json::to_value(local.reader.show(&session.parse().map_err(anyhow::Error::msg)?)?)?
                }
            };
            output::show(&detail, matches!(format, Format::Json))?;
            Ok(0)
        }
        Command::Replay { session, speed, instant, only, format, config, .. } => {
            if let Some(bad) = only.iter().find(|o| !replay::CATEGORIES.contains(&o.as_str())) {
                anyhow::bail!("--only '{bad}' is not one of {}", replay::CATEGORIES.join(", "));
            }
            if !(speed > 0.0 && speed.is_finite()) {
                anyhow::bail!("--speed must be a positive number");
            }
            let timeline = match local::source(socket.clone(), config)? {
                Source::Daemon(socket) => call(&socket, &Request::Replay { session })?,
                Source::Local(local) => {
                    let (sessions, events) = local.reader.timeline(&session.parse().map_err(anyhow::Error::msg)?)?;
                    serde_json::json!({"sessions": sessions, "events": events})
                }
            };
            match format {
                ReplayFormat::Text => replay::text(
                    &timeline,
                    &only,
                    if instant { replay::Pace::Instant } else { replay::Pace::Speed(speed) },
                )?,
                ReplayFormat::Json => replay::json_lines(&timeline, &only)?,
                ReplayFormat::Asciicast => replay::asciicast(&timeline)?,
            }
            Ok(0)
        }
        Command::Verify { session, since, report, key, format, config, .. } => {
            let key_text = match &key {
                Some(path) => Some(
                    std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read key file {}", path.display()))?,
                ),
                None => None,
            };
            if let Some(report) = report {
                let text = std::fs::read_to_string(&report)
                    .with_context(|| format!("cannot read report {}", report.display()))?;
                return match crate::report::verify_report(&text, key_text.as_deref().unwrap_or_default()) {
                    Ok(checked) => {
                        output::report_verified(&checked, matches!(format, Format::Json))?;
                        Ok(0)
                    }
                    Err(why) => {
                        eprintln!("tollgate: {}: {why}", report.display());
                        Ok(1)
                    }
                };
            }
            let since = since.map(|s| window::bound(&s, std::time::SystemTime::now())).transpose()?;
            let key_text = key_text.map(|text| text.trim().to_owned());
            let verification = match local::source(socket.clone(), config)? {
                Source::Daemon(socket) => call(&socket, &Request::Verify { session, since, key: key_text })?,
                Source::Local(local) => {
                    let session = session.map(|s| s.parse()).transpose().map_err(anyhow::Error::msg)?;
                    let public = match key_text {
                        Some(text) => text,
                        None => {
                            let path = Config::ledger_key_path(&local.config.state_dir);
                            crate::store::ledger::host_public_key(&path).with_context(|| {
                                format!("no host key to verify with at {}: pass --key FILE", path.display())
                            })?
                        }
                    };
                    serde_json::to_value(local.reader.verify(session.as_ref(), since.as_deref(), &public)?)?
                }
            };
            Ok(output::verification(&verification, matches!(format, Format::Json))?)
        }
        Command::Report {
            since, until, identity, format, output: path, config, from, token_file, ca, keys, ..
        } => {
            let now = std::time::SystemTime::now();
            let query = crate::report::ReportQuery {
                since: window::bound(&since, now)?,
                until: match until {
                    Some(until) => window::bound(&until, now)?,
                    None => rfc3339(now + std::time::Duration::from_secs(1)),
                },
                identity,
            };
            if !from.is_empty() {
                let token_file = token_file.context("--from needs --token-file")?;
                let token = std::fs::read_to_string(&token_file)
                    .with_context(|| format!("cannot read token file {}", token_file.display()))?;
                let trusted: Vec<String> = keys
                    .iter()
                    .map(|k| {
                        std::fs::read_to_string(k).with_context(|| format!("cannot read key file {}", k.display()))
                    })
                    .collect::<Result<_, _>>()?;
                let mut params =
                    vec![("since", query.since.as_str()), ("until", query.until.as_str()), ("format", "json")];
                if let Some(identity) = &query.identity {
                    params.push(("identity", identity));
                }
                let mut pulled = Vec::new();
                for base in &from {
                    let text = crate::report::fleet::pull(base, token.trim(), ca.as_deref(), &params)
                        .map_err(anyhow::Error::msg)?;
                    pulled.push((
                        base.clone(),
                        crate::report::fleet::check(base, &text, &trusted).map_err(anyhow::Error::msg)?,
                    ));
                }
                let merged = crate::report::fleet::merge(pulled);
                let text = crate::report::fleet::render(&merged, format_name(format)).map_err(anyhow::Error::msg)?;
                match path {
                    Some(path) => {
                        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?
                    }
                    None => print!("{text}"),
                }
                return Ok(0);
            }
            let report = match local::source(socket.clone(), config)? {
                Source::Daemon(socket) => call(&socket, &Request::Report(query))?,
                Source::Local(local) => {
                    let policies = local.policies()?;
                    let key =
                        crate::store::ledger::LedgerKey::load(&Config::ledger_key_path(&local.config.state_dir)).ok();
                    let report = crate::report::build(
                        &policies,
                        |a, b| crate::session::grants::views_from_log(&policies, &local.reader, a, b),
                        &local.reader,
                        local.config.delegation.review_depth,
                        &query,
                        key.as_ref(),
                    )?;
                    serde_json::to_value(report)?
                }
            };
            let text = output::report(report, format_name(format))?;
            match path {
                Some(path) => {
                    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?
                }
                None => print!("{text}"),
            }
            Ok(0)
        }
        Command::Status { format, .. } => {
            let status = call(&socket_path(socket.clone())?, &Request::Status)?;
            output::status(&status, matches!(format, Format::Json))?;
            Ok(0)
        }
        Command::Token(TokenCommand::Mint { sub, claims, expires_in, state_dir, config, .. }) => {
            let state_dir = match (state_dir, config) {
                (Some(dir), _) => dir,
                (None, Some(path)) => Config::load(&path)?.state_dir,
                (None, None) => default_config()?.with_context(no_config)?.state_dir,
            };
            let key = dev::ensure_key(&Config::dev_key_path(&state_dir))?;
            let token = dev::mint(&key, &sub, &parse_claims(&claims)?, expires_in)?;
            println!("{token}");
            Ok(0)
        }
        Command::Approvals { format, watch: false, .. } => {
            let pending = call(&socket_path(socket.clone())?, &Request::Approvals)?;
            output::approvals(&pending, matches!(format, Format::Json))?;
            Ok(0)
        }
        Command::Approvals { format, watch: true, .. } => {
            // Each new held request once, as it comes, until interrupted.
            let socket = socket_path(socket.clone())?;
            let mut seen = std::collections::BTreeSet::new();
            loop {
                let pending = call(&socket, &Request::Approvals)?;
                let new: Vec<serde_json::Value> = pending
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| seen.insert(p["id"].as_str().unwrap_or_default().to_owned()))
                    .cloned()
                    .collect();
                if !new.is_empty() {
                    output::approvals(&serde_json::Value::Array(new), matches!(format, Format::Json))?;
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
        }
        Command::Windows { action: None, format, .. } => {
            let windows = call(&socket_path(socket.clone())?, &Request::Windows)?;
            output::windows(&windows, matches!(format, Format::Json))?;
            Ok(0)
        }
        Command::Windows { action: Some(WindowsCommand::Revoke { id, .. }), .. } => {
            let closed = call(&socket_path(socket.clone())?, &Request::CloseWindow { id })?;
            println!(
                "closed {} (session {}, {})",
                closed["id"].as_str().unwrap_or("-"),
                closed["session"].as_str().unwrap_or("-"),
                closed["rule"].as_str().unwrap_or("-")
            );
            Ok(0)
        }
        Command::Approve { id, window, .. } => {
            let request = Request::Approve { id, window_secs: window.map(|w| w.as_secs()) };
            let answer = call(&socket_path(socket.clone())?, &request)?;
            output::decision(&answer);
            Ok(0)
        }
        Command::Deny { id, reason, .. } => {
            let answer = call(&socket_path(socket.clone())?, &Request::Deny { id, reason })?;
            output::decision(&answer);
            Ok(0)
        }
        Command::Revoke { session, reason, .. } => {
            let answer = call(&socket_path(socket.clone())?, &Request::Revoke { session, reason })?;
            output::revoked(&answer);
            Ok(0)
        }
        Command::Policy(PolicyCommand::Explain { identity, to, exec, sql, policies, config, .. }) => {
            // The running daemon's loaded policy by default; files when given.
            let paths = if policies.is_empty() {
                let config = local::config(config)?;
                let socket = socket.clone().unwrap_or_else(|| config.socket.clone());
                if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                    let exec = exec.map(|p| p.display().to_string());
                    let answer = call(&socket, &Request::Explain { identity, to, exec, sql })?;
                    for line in answer["lines"].as_array().into_iter().flatten().filter_map(|l| l.as_str()) {
                        println!("{line}");
                    }
                    return Ok(0);
                }
                eprintln!("tollgate: no daemon at {}; explaining the policies of the configuration", socket.display());
                config.policies
            } else {
                policies
            };
            let set = crate::policy::PolicySet::load(&paths)?;
            let lines = crate::policy::explain::explain_lines(
                &set,
                &Default::default(),
                &identity,
                to.as_deref(),
                exec.as_deref(),
                sql.as_deref(),
                &crate::policy::explain::resolve_with_libc,
            )
            .map_err(anyhow::Error::msg)?;
            for line in lines {
                println!("{line}");
            }
            Ok(0)
        }
        Command::Policy(PolicyCommand::Check { files, .. }) => {
            let report = crate::policy::check(&files);
            for line in report.errors.iter().chain(&report.warnings) {
                eprintln!("{line}");
            }
            let errors = report.errors;
            if errors.is_empty() {
                println!("ok: {} policy file(s)", files.len());
                Ok(0)
            } else {
                Ok(1)
            }
        }
    }
}

/// Writes shell completions (bash, zsh, fish) and a man page per command,
/// made from the same definitions that parse the command line.
fn generate(dir: &std::path::Path) -> anyhow::Result<()> {
    use clap::CommandFactory;
    let completions = dir.join("completions");
    let man = dir.join("man");
    for path in [&completions, &man] {
        std::fs::create_dir_all(path).with_context(|| format!("cannot create {}", path.display()))?;
    }
    let mut command = Cli::command();
    for (shell, file) in [
        (clap_complete::Shell::Bash, "tollgate.bash"),
        (clap_complete::Shell::Zsh, "_tollgate"),
        (clap_complete::Shell::Fish, "tollgate.fish"),
    ] {
        let mut out = std::fs::File::create(completions.join(file))?;
        clap_complete::generate(shell, &mut command, "tollgate", &mut out);
    }
    clap_mangen::generate_to(Cli::command(), &man).context("cannot write the man pages")?;
    Ok(())
}

fn format_name(format: ReportFormat) -> &'static str {
    match format {
        ReportFormat::Md => "md",
        ReportFormat::Json => "json",
        ReportFormat::Html => "html",
    }
}

/// `NAME=VALUE` pairs to claims; a repeated name becomes an array.
fn parse_claims(pairs: &[String]) -> anyhow::Result<BTreeMap<String, serde_json::Value>> {
    let mut claims: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for pair in pairs {
        let (name, value) = pair.split_once('=').with_context(|| format!("claim '{pair}' must be NAME=VALUE"))?;
        let value = serde_json::Value::String(value.to_owned());
        match claims.remove(name) {
            None => claims.insert(name.to_owned(), value),
            Some(serde_json::Value::Array(mut items)) => {
                items.push(value);
                claims.insert(name.to_owned(), serde_json::Value::Array(items))
            }
            Some(first) => claims.insert(name.to_owned(), serde_json::Value::Array(vec![first, value])),
        };
    }
    Ok(claims)
}

/// Sends a request; an error answer becomes an error naming the daemon's reason.
fn call(socket: &std::path::Path, request: &Request) -> anyhow::Result<serde_json::Value> {
    match client::call(socket, request)? {
        Response::Ok(body) => Ok(body),
        Response::Error { message, .. } => anyhow::bail!("{message}"),
    }
}

/// The daemon's log on stderr: colour only on a terminal; under systemd
/// (JOURNAL_STREAM) each line starts with its syslog priority (`<3>`),
/// which journald reads as the entry's priority; or JSON lines.
fn init_logging(format: crate::config::LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        crate::config::LogFormat::Json => builder.json().init(),
        crate::config::LogFormat::Text if journal => {
            // The journal stamps entries itself.
            let inner = tracing_subscriber::fmt::format().with_ansi(false).without_time();
            builder.with_ansi(false).event_format(JournalPriority(inner)).init();
        }
        crate::config::LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// Puts the syslog priority of each event's level before its line.
struct JournalPriority<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for JournalPriority<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            tracing::Level::DEBUG | tracing::Level::TRACE => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_claims_become_arrays() {
        let claims = parse_claims(&["a=1".into(), "b=x".into(), "a=2".into()]).expect("parses");
        assert_eq!(claims["a"], serde_json::json!(["1", "2"]));
        assert_eq!(claims["b"], serde_json::json!("x"));
        assert!(parse_claims(&["novalue".into()]).is_err());
    }
}
