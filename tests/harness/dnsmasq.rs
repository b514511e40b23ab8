//! A real DNS server on loopback for the resolver tests: Debian's dnsmasq
//! with fixed answers, logging every query it gets, stopped when dropped.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::free_loopback_port;

/// The server.
pub struct Dnsmasq {
    child: Child,
    /// Its UDP and TCP port on 127.0.0.1.
    pub port: u16,
    log: PathBuf,
    _dir: TempDir,
}

impl Dnsmasq {
    /// Answers `records` (`name`, `address`) with `ttl` seconds, and each
    /// `(alias, target)` CNAME; refuses recursion for anything else.
    pub fn start(records: &[(&str, &str)], cnames: &[(&str, &str)], ttl: u32) -> Dnsmasq {
        let dir = tempfile::Builder::new().prefix("tollgate-dnsmasq-").tempdir().expect("temp dir");
        let log = dir.path().join("queries.log");
        let port = free_loopback_port().expect("a free port");
        let mut command = Command::new("dnsmasq");
        command
            .args(["--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll", "--bind-interfaces"])
            .args(["--listen-address=127.0.0.1", "--user=root", "--log-queries", "--pid-file="])
            .arg(format!("--port={port}"))
            .arg(format!("--local-ttl={ttl}"))
            .arg(format!("--log-facility={}", log.display()));
        for (name, address) in records {
            command.arg(format!("--host-record={name},{address}"));
        }
        for (alias, target) in cnames {
            command.arg(format!("--cname={alias},{target}"));
        }
        let child = command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("dnsmasq");
        let server = Dnsmasq { child, port, log, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !server.queries().contains("started") {
            assert!(Instant::now() < deadline, "dnsmasq did not start: {}", server.queries());
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// Its log: every query it received.
    pub fn queries(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
