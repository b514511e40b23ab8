//! Loopback listeners that connect attempts are aimed at, the commands that make them, and
//! which process holds which TCP socket (read from `/proc`).

use std::collections::BTreeSet;
use std::fs;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, TcpListener};

/// A TCP listener on a loopback address and a kernel-chosen port, so parallel tests never
/// collide. It never calls `accept` on its own: whether a connect succeeded is read from the
/// accept queue afterwards.
pub struct Listener {
    inner: TcpListener,
    addr: SocketAddr,
}

impl Listener {
    /// Binds `ip` (e.g. "127.0.0.2" or "::1") on port 0.
    pub fn bind(ip: &str) -> Listener {
        let ip: IpAddr = ip.parse().unwrap_or_else(|err| panic!("bad listener address {ip:?}: {err}"));
        let inner = TcpListener::bind((ip, 0)).unwrap_or_else(|err| panic!("binding a TCP listener on {ip}: {err}"));
        inner.set_nonblocking(true).unwrap_or_else(|err| panic!("making the listener on {ip} non-blocking: {err}"));
        let addr =
            inner.local_addr().unwrap_or_else(|err| panic!("reading the address of the listener on {ip}: {err}"));
        Listener { inner, addr }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Accepts and counts every connection that has completed so far.
    ///
    /// A successful connect leaves its connection in the accept queue even after the client has
    /// closed it, so once the connecting command has exited this is exactly the number of
    /// connect attempts that got through.
    pub fn take_connections(&self) -> usize {
        let mut count = 0;
        loop {
            match self.inner.accept() {
                Ok(_) => count += 1,
                Err(err) if err.kind() == ErrorKind::WouldBlock => return count,
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) => panic!("accepting on {}: {err}", self.addr),
            }
        }
    }
}

/// Shell script for bash that connects a TCP socket to `$0`:`$1` through bash's /dev/tcp.
///
/// bash reports a failed connect as "bash: connect: <strerror>" on stderr and exits 1. It uses
/// an AF_INET6 socket for IPv6 literals, including IPv4-mapped ones like ::ffff:127.0.0.2.
pub const CONNECT_SCRIPT: &str = r#"exec 3<>"/dev/tcp/$0/$1""#;

/// argv for a governed command that prints its session id, then connects to `host`:`port`.
pub fn session_connect_argv(host: &str, port: u16) -> Vec<String> {
    vec![
        "/bin/bash".to_owned(),
        "-c".to_owned(),
        format!(r#"echo "$TOLLGATE_SESSION"; {CONNECT_SCRIPT}"#),
        host.to_owned(),
        port.to_string(),
    ]
}

/// The `/proc` names (`socket:[INODE]`) of the TCP sockets, IPv4 or IPv6, whose line in
/// `/proc/net/tcp*` passes `wanted(local, remote, state)`: addresses as the kernel prints them
/// (`HEXADDR:HEXPORT`), the state in hex (`01` established, `0A` listening).
pub fn tcp_sockets(wanted: impl Fn(&str, &str, &str) -> bool) -> BTreeSet<String> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .flat_map(|table| {
            fs::read_to_string(table).unwrap_or_default().lines().skip(1).map(str::to_owned).collect::<Vec<_>>()
        })
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let inode = fields.get(9)?;
            wanted(fields.get(1)?, fields.get(2)?, fields.get(3)?).then(|| format!("socket:[{inode}]"))
        })
        .collect()
}

/// The descriptors process `pid` holds on any of `sockets` (names from [`tcp_sockets`]).
pub fn fds_on(pid: u32, sockets: &BTreeSet<String>) -> Vec<i32> {
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten().flatten();
    fds.filter_map(|entry| {
        let target = fs::read_link(entry.path()).ok()?;
        sockets.contains(target.to_str()?).then(|| entry.file_name().to_str()?.parse().ok())?
    })
    .collect()
}
