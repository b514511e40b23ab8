//! A real PostgreSQL server for the tests: Debian's binaries, a data
//! directory of this test process's own, on loopback at a free port. One
//! server serves every test of the process; each test gets a database and a
//! login role of its own. The server is started on a thread that lives as
//! long as the process and dies with it (parent-death signal).

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::{free_loopback_port, unique_tag};

/// The server.
pub struct Postgres {
    bin: PathBuf,
    /// TCP port on 127.0.0.1 and ::1.
    pub port: u16,
    socket_dir: PathBuf,
    /// The server's log: connections and every statement it ran.
    pub log: PathBuf,
    /// The CA that signed the server's certificate (it speaks TLS to clients that ask).
    pub ca: PathBuf,
}

/// A test's database with a login role the proxy uses.
pub struct Database {
    /// The database's name.
    pub name: String,
    /// The role the route's credential logs in as.
    pub role: String,
}

fn postgres_ids() -> (u32, u32) {
    let id = |flag: &str| {
        let out = Command::new("id").args([flag, "postgres"]).output().expect("running id");
        assert!(out.status.success(), "no postgres user: install Debian's postgresql package (cargo xtask setup)");
        String::from_utf8_lossy(&out.stdout).trim().parse::<u32>().expect("a numeric id")
    };
    (id("-u"), id("-g"))
}

fn binaries() -> PathBuf {
    let mut found: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .expect("/usr/lib/postgresql: install Debian's postgresql package (cargo xtask setup)")
        .filter_map(|entry| entry.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("postgres").is_file())
        .collect();
    found.sort();
    found.pop().expect("no PostgreSQL server binaries under /usr/lib/postgresql")
}

/// The process's server, started on first use.
pub fn server() -> &'static Postgres {
    static SERVER: OnceLock<Postgres> = OnceLock::new();
    SERVER.get_or_init(Postgres::start)
}

impl Postgres {
    fn start() -> Postgres {
        let bin = binaries();
        let (uid, gid) = postgres_ids();
        let root = PathBuf::from(format!("/tmp/tollgate-pg-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let (data, socket_dir, log) = (root.join("data"), root.join("socket"), root.join("server.log"));
        fs::create_dir_all(&socket_dir).expect("creating the server's directories");
        for path in [&root, &socket_dir] {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown to postgres");
        }
        let initdb = Command::new(bin.join("initdb"))
            .args(["-D", &data.to_string_lossy(), "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .uid(uid)
            .gid(gid)
            .output()
            .expect("running initdb");
        assert!(initdb.status.success(), "initdb failed: {}", String::from_utf8_lossy(&initdb.stderr));
        // md5 for one role, so both of the proxy's password methods meet a real server.
        // `md5` asks for md5 where a role's password is stored as md5, and
        // for SCRAM where it is stored as SCRAM: both of the proxy's methods meet a real server.
        let hba = "local all all trust\nhost all all 127.0.0.1/32 md5\nhost all all ::1/128 md5\n";
        fs::write(data.join("pg_hba.conf"), hba).expect("writing pg_hba.conf");
        let pki = crate::pki::Pki::new(&root, "IP:127.0.0.1,IP:::1,DNS:localhost");
        for file in [&pki.cert, &pki.key] {
            std::os::unix::fs::chown(file, Some(uid), Some(gid)).expect("chown the server's certificate");
        }
        fs::set_permissions(&pki.key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod the key");
        let port = free_loopback_port().expect("a free port");
        let log_file = fs::File::create(&log).expect("creating the server log");
        std::os::unix::fs::chown(&log, Some(uid), Some(gid)).expect("chown the log");
        let mut command = Command::new(bin.join("postgres"));
        command
            .args(["-D", &data.to_string_lossy(), "-p", &port.to_string(), "-k", &socket_dir.to_string_lossy()])
            .args(["-c", "listen_addresses=127.0.0.1,::1", "-c", "log_connections=on", "-c", "log_statement=all"])
            .args(["-c", "log_line_prefix=%m [%p] user=%u db=%d ", "-c", "fsync=off", "-c", "max_connections=200"])
            .args(["-c", "ssl=on", "-c", &format!("ssl_cert_file={}", pki.cert.display())])
            .args(["-c", &format!("ssl_key_file={}", pki.key.display())])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .uid(uid)
            .gid(gid);
        // SAFETY: prctl with constant arguments, between fork and exec.
        unsafe {
            command.pre_exec(|| {
                // Immediate shutdown when this test process exits.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let (started, spawned) = std::sync::mpsc::channel();
        // The parent-death signal follows the thread that forked: this one lives as long as the process.
        std::thread::spawn(move || match command.spawn() {
            Ok(mut child) => {
                let _ = started.send(Ok(()));
                let _ = child.wait();
            }
            Err(e) => {
                let _ = started.send(Err(e.to_string()));
            }
        });
        spawned.recv().expect("the server thread").expect("starting postgres");
        let server = Postgres { bin, port, socket_dir, log, ca: pki.ca };
        let deadline = Instant::now() + Duration::from_secs(60);
        while server.try_sql("postgres", "SELECT 1").is_err() {
            assert!(Instant::now() < deadline, "PostgreSQL did not start:\n{}", server.log_text());
            std::thread::sleep(Duration::from_millis(200));
        }
        server
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The server's log from byte `offset` on (see [`Postgres::log_len`]).
    pub fn log_since(&self, offset: usize) -> String {
        self.log_text().get(offset..).unwrap_or_default().to_owned()
    }

    /// How long the server's log is now.
    pub fn log_len(&self) -> usize {
        fs::metadata(&self.log).map_or(0, |m| m.len() as usize)
    }

    fn try_sql(&self, database: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", &self.socket_dir.to_string_lossy(), "-p", &self.port.to_string(), "-U", "postgres"])
            .args(["-d", database, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Runs `sql` as the superuser, outside any session (over the Unix
    /// socket, which no session rule governs): what the server really holds.
    pub fn sql(&self, database: &str, sql: &str) -> String {
        self.try_sql(database, sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// A fresh database owned by a fresh role (named `prefix_...`; an
    /// `md5_` prefix makes the server ask for md5) with `password`.
    pub fn database(&self, prefix: &str, password: &str) -> Database {
        let tag = unique_tag().replace('-', "_");
        let (name, role) = (format!("db_{tag}"), format!("{prefix}_{tag}"));
        let encryption = if prefix.starts_with("md5") { "md5" } else { "scram-sha-256" };
        let quoted = password.replace('\'', "''");
        self.sql(
            "postgres",
            &format!("SET password_encryption = '{encryption}'; CREATE ROLE {role} LOGIN PASSWORD '{quoted}'"),
        );
        self.sql("postgres", &format!("CREATE DATABASE {name} OWNER {role}"));
        Database { name, role }
    }

    /// The socket directory (for clients outside sessions).
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// A PostgreSQL binary (psql, pgbench) of the server's version.
    pub fn binary(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }
}
