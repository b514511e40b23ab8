//! `cargo xtask bench`: tollgate against the direct path and against the
//! peers users already run, every pair in one run on one machine, several
//! rounds each. Load generators and peers are Debian's (wrk, nginx,
//! pgbouncer, pgbench), started here on loopback; a peer that cannot start
//! fails the run. Speed is measured here and never asserted in the tests
//! (their smoke run only checks that the numbers are sane).

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::net::{fds_on, tcp_sockets};
use crate::postgres::server;
use crate::proxy::{BUILD_BOTS, Secret};
use crate::{Daemon, RunOutput, free_loopback_port};

/// How long and how often.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Rounds of each measurement.
    pub rounds: usize,
    /// Seconds of each load run.
    pub seconds: u32,
    /// Execs in the exec row.
    pub execs: usize,
    /// Connects in the connect row.
    pub connects: usize,
    /// Live sessions in the resource row.
    pub sessions: usize,
}

impl Plan {
    /// The full run.
    pub const FULL: Plan = Plan { rounds: 3, seconds: 5, execs: 10_000, connects: 100_000, sessions: 50 };
    /// `--quick`: one short round of everything.
    pub const QUICK: Plan = Plan { rounds: 1, seconds: 1, execs: 500, connects: 2_000, sessions: 5 };
}

/// One measured series.
#[derive(Debug, Clone)]
pub struct Series {
    /// What ran (`direct`, `nginx`, `tollgate`...).
    pub name: String,
    /// One value per round.
    pub samples: Vec<f64>,
}

impl Series {
    /// The median of the rounds.
    pub fn median(&self) -> f64 {
        median(&self.samples)
    }

    fn spread(&self) -> (f64, f64) {
        spread(&self.samples)
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn spread(values: &[f64]) -> (f64, f64) {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

/// A figure a target speaks of.
#[derive(Debug, Clone)]
pub struct Ratio {
    /// What it is (`tollgate / nginx`).
    pub name: String,
    /// Its value: for a ratio of two series, the median of the rounds' ratios.
    pub value: f64,
    /// The lowest and highest of the rounds' ratios, where there were several.
    pub spread: Option<(f64, f64)>,
    /// The target, as the issue states it.
    pub target: String,
}

impl Ratio {
    fn single(name: &str, value: f64, target: &str) -> Ratio {
        Ratio { name: name.to_owned(), value, spread: None, target: target.to_owned() }
    }
}

/// One row of the table.
#[derive(Debug, Clone)]
pub struct Row {
    /// What is measured.
    pub what: String,
    /// The workload, so anyone can rerun it.
    pub workload: String,
    /// The unit of the values.
    pub unit: String,
    /// The series, the reference first.
    pub series: Vec<Series>,
    /// The figures the targets speak of.
    pub ratios: Vec<Ratio>,
}

impl Row {
    fn new(what: impl Into<String>, workload: impl Into<String>, unit: impl Into<String>) -> Row {
        Row { what: what.into(), workload: workload.into(), unit: unit.into(), series: Vec::new(), ratios: Vec::new() }
    }

    fn find(&self, name: &str) -> Option<&Series> {
        self.series.iter().find(|s| s.name == name)
    }

    fn get(&self, name: &str) -> f64 {
        self.find(name).map_or(0.0, Series::median)
    }

    /// `of` over `over`, round by round: series measured in turns (see
    /// [`interleaved`]) are compared with what ran beside them, so that a
    /// host that was slower for a while weighs on both sides of a ratio.
    /// Series of unequal rounds are compared by their medians.
    fn ratio(&mut self, name: &str, of: &str, over: &str, target: &str) {
        let empty = Vec::new();
        let a = self.find(of).map_or(&empty, |s| &s.samples);
        let b = self.find(over).map_or(&empty, |s| &s.samples);
        let paired = !a.is_empty() && a.len() == b.len() && b.iter().all(|&v| v > 0.0);
        let ratio = if paired {
            let rounds: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b).collect();
            let spread = (rounds.len() > 1).then(|| spread(&rounds));
            Ratio { name: name.to_owned(), value: median(&rounds), spread, target: target.to_owned() }
        } else {
            let (a, b) = (median(a), median(b));
            Ratio::single(name, if b > 0.0 { a / b } else { 0.0 }, target)
        };
        self.ratios.push(ratio);
    }
}

/// The whole run.
pub struct Report {
    /// Every row.
    pub rows: Vec<Row>,
    /// The machine it ran on.
    pub machine: String,
    /// Records lost by the daemon during the run (should be 0).
    pub lost: u64,
}

impl Report {
    /// The table, as printed and as the README carries it.
    pub fn table(&self) -> String {
        let mut out = format!("machine: {}\n\n", self.machine);
        out.push_str("| what | workload | series (median, min-max) | ratios (target) |\n| --- | --- | --- | --- |\n");
        for row in &self.rows {
            let series: Vec<String> = row
                .series
                .iter()
                .map(|s| {
                    let (min, max) = s.spread();
                    // A row of mixed measures names each one's unit in the series instead.
                    let unit = if row.unit.is_empty() { String::new() } else { format!(" {}", row.unit) };
                    format!("{}: {}{unit} ({}-{})", s.name, fmt(s.median()), fmt(min), fmt(max))
                })
                .collect();
            let ratios: Vec<String> = row
                .ratios
                .iter()
                .map(|r| match r.spread {
                    Some((low, high)) => {
                        format!("{}: {} ({}-{}) ({})", r.name, fmt(r.value), fmt(low), fmt(high), r.target)
                    }
                    None => format!("{}: {} ({})", r.name, fmt(r.value), r.target),
                })
                .collect();
            out.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                row.what,
                row.workload,
                series.join("<br>"),
                ratios.join("<br>")
            ));
        }
        out.push_str(&format!("\nrecords lost during the run: {}\n", self.lost));
        out
    }

    /// The run as JSON.
    pub fn json(&self) -> Value {
        json!({
            "machine": self.machine,
            "lost": self.lost,
            "rows": self.rows.iter().map(|row| json!({
                "what": row.what,
                "workload": row.workload,
                "unit": row.unit,
                "series": row.series.iter().map(|s| json!({
                    "name": s.name, "median": s.median(), "samples": s.samples,
                })).collect::<Vec<_>>(),
                "ratios": row.ratios.iter().map(|r| json!({
                    "name": r.name, "value": r.value, "target": r.target,
                    "rounds_min": r.spread.map(|s| s.0), "rounds_max": r.spread.map(|s| s.1),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }
}

fn fmt(value: f64) -> String {
    if value >= 100.0 { format!("{value:.0}") } else { format!("{value:.2}") }
}

fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned()))
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores, {cpu}, Linux {}", kernel.trim())
}

/// nginx as the trivial upstream every path reaches (ports `upstream`)
/// and, in processes of their own, as the peer reverse proxy (one worker,
/// upstream keepalive): without an access log (port `proxy`), and with
/// one as Debian's default configuration keeps it, a line written per
/// request (port `logging_proxy`), since tollgate records every exchange.
/// Were one nginx both upstream and peer, the peer's single worker would
/// also do the upstream's work, and the peer would measure slower than it is.
pub struct Nginx {
    /// The upstream's listening ports.
    pub upstream_ports: Vec<u16>,
    /// The peer reverse proxy's port.
    pub peer_port: u16,
    /// The port of the peer that writes an access log.
    pub logging_peer_port: u16,
    /// That peer's access log.
    pub peer_access_log: PathBuf,
    _upstream: NginxProcess,
    _peer: NginxProcess,
    _logging_peer: NginxProcess,
}

/// One nginx (its master; the worker is the master's child).
struct NginxProcess {
    child: Child,
    /// Its configuration, logs and files, removed when it stops.
    dir: tempfile::TempDir,
}

/// A 1 MB JSON body with values the masks match.
fn big_body() -> String {
    let mut items = Vec::new();
    let mut size = 0;
    let mut i = 0;
    while size < 1 << 20 {
        let item = format!(
            r#"{{"id":{i},"email":"user{i}@example.com","card":"4111-1111-1111-{:04}","note":"order {i} shipped"}}"#,
            i % 10000
        );
        size += item.len() + 1;
        items.push(item);
        i += 1;
    }
    format!("[{}]", items.join(","))
}

impl Nginx {
    /// Starts the upstream and the peers; panics (the bench fails loudly) if one cannot.
    pub fn start(upstream: &[u16], proxy: u16, logging_proxy: u16) -> Nginx {
        let www = tempfile::tempdir().expect("temp dir");
        fs::write(www.path().join("big.json"), big_body()).expect("big body");
        let listens: String = upstream.iter().map(|port| format!("    listen 127.0.0.1:{port};\n")).collect();
        let upstream_servers = format!(
            "  server {{\n{listens}    location = /big.json {{ root {www}; default_type application/json; }}\n    location / {{ default_type application/json; return 200 '{{\"ok\":true,\"user\":\"ann@example.com\"}}'; }}\n  }}\n",
            www = www.path().display(),
        );
        let peer_servers = |listen: u16| {
            format!(
                "  upstream backend {{ server 127.0.0.1:{first}; keepalive 64; }}\n\
                 server {{\n    listen 127.0.0.1:{listen};\n    location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n",
                first = upstream[0],
            )
        };
        let started = NginxProcess::start("the nginx upstream", &upstream_servers, upstream[0], Some(www), false);
        let peer = NginxProcess::start("the nginx peer", &peer_servers(proxy), proxy, None, false);
        let logging_peer = NginxProcess::start(
            "the nginx peer with an access log",
            &peer_servers(logging_proxy),
            logging_proxy,
            None,
            true,
        );
        Nginx {
            upstream_ports: upstream.to_vec(),
            peer_port: proxy,
            logging_peer_port: logging_proxy,
            peer_access_log: logging_peer.access_log(),
            _upstream: started,
            _peer: peer,
            _logging_peer: logging_peer,
        }
    }
}

impl NginxProcess {
    /// Runs nginx with `servers` in its http block (one worker; an access
    /// log in nginx's default format, unbuffered, if `log`) and waits until
    /// it listens on `port`. `www`, when given, is where the servers' files
    /// are: kept as long as this nginx runs.
    fn start(what: &str, servers: &str, port: u16, www: Option<tempfile::TempDir>, log: bool) -> NginxProcess {
        let dir = www.unwrap_or_else(|| tempfile::tempdir().expect("temp dir"));
        let p = |name: &str| dir.path().join(name).display().to_string();
        fs::create_dir(dir.path().join("tmp")).expect("tmp");
        let access_log = if log { p("access.log") } else { "off".to_owned() };
        let config = format!(
            "daemon off;\nworker_processes 1;\nerror_log {err};\npid {pid};\nevents {{ worker_connections 1024; }}\n\
             http {{\n  access_log {access_log};\n  client_body_temp_path {tmp};\n  proxy_temp_path {tmp};\n  fastcgi_temp_path {tmp};\n  uwsgi_temp_path {tmp};\n  scgi_temp_path {tmp};\n  keepalive_requests 1000000;\n{servers}}}\n",
            err = p("error.log"),
            pid = p("nginx.pid"),
            tmp = p("tmp"),
        );
        fs::write(dir.path().join("nginx.conf"), config).expect("config");
        let child = Command::new("nginx")
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{what} does not start (cargo xtask setup installs nginx): {e}"));
        // Owned first, so a failed wait still stops it.
        let started = NginxProcess { child, dir };
        wait_for_port(port, what);
        started
    }

    /// Where its access log is when it was started with one.
    fn access_log(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }
}

impl Drop for NginxProcess {
    fn drop(&mut self) {
        // SIGTERM to the master stops its workers too.
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// The pids of every process holding a TCP socket listening on `port` (IPv4 or IPv6).
pub fn listening_pids(port: u16) -> BTreeSet<u32> {
    let suffix = format!(":{port:04X}");
    let listening = tcp_sockets(|local, _, state| local.ends_with(&suffix) && state == "0A");
    let processes = fs::read_dir("/proc").into_iter().flatten().flatten();
    processes
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| !fds_on(*pid, &listening).is_empty())
        .collect()
}

fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start listening on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What wrk measured.
struct Wrk {
    requests_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Requests per second one connection offers when it pauses 1 ms between
/// requests that take a few tenths of a millisecond.
const PACED_PER_CONNECTION: f64 = 900.0;

fn wrk_argv(url: &str, connections: u32, seconds: u32, close: bool) -> Vec<String> {
    let mut argv =
        vec!["wrk".to_owned(), "-t1".into(), format!("-c{connections}"), format!("-d{seconds}s"), "--latency".into()];
    if close {
        argv.extend(["-H".to_owned(), "Connection: close".to_owned()]);
    }
    argv.push(url.to_owned());
    argv
}

fn parse_wrk(out: &str) -> Wrk {
    let requests_per_sec = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:").map(|v| v.trim().parse().unwrap_or(0.0)))
        .unwrap_or_else(|| panic!("wrk printed no Requests/sec:\n{out}"));
    let percentile = |p: &str| {
        out.lines()
            .find_map(|l| {
                let mut words = l.split_whitespace();
                (words.next() == Some(p)).then(|| words.next().map(duration_ms)).flatten()
            })
            .unwrap_or(0.0)
    };
    Wrk { requests_per_sec, p50_ms: percentile("50%"), p99_ms: percentile("99%") }
}

fn duration_ms(text: &str) -> f64 {
    let (number, factor) = if let Some(v) = text.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = text.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = text.strip_suffix('s') {
        (v, 1000.0)
    } else {
        (text, 1.0)
    };
    number.parse::<f64>().unwrap_or(0.0) * factor
}

fn run_direct(argv: &[String]) -> RunOutput {
    let mut command = Command::new(&argv[0]);
    command.args(&argv[1..]);
    crate::run_with_timeout(&mut command, Duration::from_secs(120)).expect("a direct run")
}

fn must(out: RunOutput, what: &str) -> String {
    assert!(out.success(), "{what} failed: {out}");
    out.stdout
}

/// The daemon's resident memory (kB) and CPU time (clock ticks).
fn usage(pid: u32) -> (f64, f64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0.0)))
        .unwrap_or(0.0);
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; 12 and 13 after the name.
    let cpu = fields.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (rss, cpu)
}

/// Runs every row with `plan`.
pub fn run(plan: Plan) -> Report {
    let (plain, masked, masked10, peer, logging_peer) = (port(), port(), port(), port(), port());
    let nginx = Nginx::start(&[plain, masked, masked10], peer, logging_peer);
    let pg = server();
    let secret = Secret::private();
    let db = pg.database("bench", &secret.value);
    let pgbench = pg.binary("pgbench").to_string_lossy().into_owned();
    let init = Command::new(&pgbench)
        .args(["-i", "-s", "1", "-q", "-h"])
        .arg(pg.socket_dir())
        .args(["-p", &pg.port.to_string(), "-U", "postgres", &db.name])
        .output()
        .expect("pgbench -i");
    assert!(init.status.success(), "pgbench -i: {}", String::from_utf8_lossy(&init.stderr));
    pg.sql(&db.name, &format!("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}", db.role));
    let bouncer = Pgbouncer::start(pg.port, &db.name, &db.role, &secret.value);
    // Every path of the pgbench row speaks TLS to pgbench: one that did not
    // would be measured doing less work.
    let mut over_tls = Command::new(pg.binary("psql"));
    over_tls
        .args(["-h", "127.0.0.1", "-p", &bouncer.port.to_string(), "-U", &db.role, "-d", &db.name])
        .args(["-tAc", "SELECT 1"])
        .env("PGSSLMODE", "require")
        .env("PGPASSWORD", &secret.value);
    must(crate::run_with_timeout(&mut over_tls, Duration::from_secs(30)).expect("psql"), "psql over TLS to pgbouncer");
    // Where the connect loops aim (a UDP connect sends nothing; the port just exists).
    let target = std::net::UdpSocket::bind("127.0.0.1:0").expect("a port for connect loops");
    let listen_port = target.local_addr().expect("its port").port();

    let mask = |regex: &str| format!("            - {{ regex: \"{regex}\" }}\n");
    let five: String = [
        "ann@example\\\\.com",
        "\\\\d{4}-\\\\d{4}-\\\\d{4}-\\\\d{4}",
        "secret-[a-z]+",
        "token=[A-Za-z0-9]+",
        "ssn:[0-9-]+",
    ]
    .iter()
    .map(|r| mask(r))
    .collect();
    let ten: String = [
        "user[0-9]+@example\\\\.com",
        "\\\\d{4}-\\\\d{4}-\\\\d{4}-\\\\d{4}",
        "secret-[a-z]+",
        "token=[A-Za-z0-9]+",
        "ssn:[0-9-]+",
        "password=[^&]+",
        "AKIA[0-9A-Z]{16}",
        "ghp_[A-Za-z0-9]{36}",
        "xox[bp]-[A-Za-z0-9-]+",
        "-----BEGIN [A-Z ]+-----",
    ]
    .iter()
    .map(|r| mask(r))
    .collect();
    let routes = format!(
        "        - to: \"127.0.0.1/32:{plain}\"\n          protocol: http\n\
         \x20       - to: \"127.0.0.1/32:{masked}\"\n          protocol: http\n          mask:\n{five}\
         \x20       - to: \"127.0.0.1/32:{masked10}\"\n          protocol: http\n          mask:\n{ten}\
         \x20       - to: \"127.0.0.1/32:{pgport}\"\n          protocol: postgres\n          credential: {{ user: {role}, password_file: {secret} }}\n\
         \x20         block:\n            - {{ statement: [drop, truncate, alter, grant, revoke] }}\n            - {{ statement: [delete, update], without_where: true }}\n            - {{ table: \"audit.*\" }}\n            - {{ function: [pg_read_file, lo_import, dblink] }}\n\
         \x20         mask:\n            - {{ column: \"email|phone\" }}\n            - {{ regex: \"\\\\b\\\\d{{4}}-\\\\d{{4}}-\\\\d{{4}}-\\\\d{{4}}\\\\b\", replace: \"****\" }}\n",
        pgport = pg.port,
        role = db.role,
        secret = secret.path.display(),
    );
    let policy = crate::proxy::policy(&routes, "");
    let daemon = Daemon::builder().policy(&policy).start();
    let token = daemon.mint("bench-bot", BUILD_BOTS);
    // At rest: started, nothing run yet.
    let pid = daemon.pid();
    let sample = |seconds: f64| {
        let (_, before) = usage(pid);
        std::thread::sleep(Duration::from_secs_f64(seconds));
        let (rss, after) = usage(pid);
        let ticks = 100.0;
        (rss / 1024.0, (after - before) / ticks / seconds * 100.0)
    };
    let (rest_rss, rest_cpu) = sample(2.0);
    let governed = |argv: &[String]| daemon.run(&token, argv);
    let mut rows = Vec::new();

    // HTTP keep-alive throughput.
    let url = |port: u16, path: &str| format!("http://127.0.0.1:{port}{path}");
    // Requests/s of one wrk run, outside any session or inside the bench's.
    let wrk_rate = |inside: bool, url: &str, connections: u32, close: bool| {
        let argv = wrk_argv(url, connections, plan.seconds, close);
        parse_wrk(&must(if inside { governed(&argv) } else { run_direct(&argv) }, "wrk")).requests_per_sec
    };
    let mut row = Row::new(
        "HTTP keep-alive requests, recording on",
        format!(
            "wrk -t1 -c32 -d{}s to a trivial nginx upstream; nginx peer: 1 worker in a process of its own, upstream keepalive, no access log (and, for reference, one with nginx's default access log)",
            plan.seconds
        ),
        "req/s",
    );
    row.series.extend(interleaved(
        plan.rounds,
        &[
            ("direct", &|| wrk_rate(false, &url(plain, "/"), 32, false)),
            ("nginx", &|| wrk_rate(false, &url(peer, "/"), 32, false)),
            ("nginx, access log", &|| wrk_rate(false, &url(logging_peer, "/"), 32, false)),
            ("tollgate", &|| wrk_rate(true, &url(plain, "/"), 32, false)),
            ("tollgate, 5 masks", &|| wrk_rate(true, &url(masked, "/"), 32, false)),
        ],
    ));
    row.ratio("tollgate / nginx", "tollgate", "nginx", ">= 1.0");
    row.ratio("5 masks / nginx", "tollgate, 5 masks", "nginx", ">= 0.9");
    row.ratio("tollgate / nginx, access log", "tollgate", "nginx, access log", "-");
    row.ratio("tollgate / direct", "tollgate", "direct", "-");
    rows.push(row);

    // Latency added at about half of tollgate's peak: each connection pauses
    // 1 ms between its requests (wrk's `delay`), with enough connections for
    // half the peak; direct and nginx get the same offered load.
    let peak = rows[0].get("tollgate");
    let connections = ((peak / 2.0) / PACED_PER_CONNECTION).ceil().max(1.0) as u32;
    let pace = std::env::temp_dir().join(format!("tollgate-bench-pace-{}.lua", std::process::id()));
    std::fs::write(&pace, "function delay()\n  return 1\nend\n").expect("the pacing script");
    let pace_arg = pace.to_string_lossy().into_owned();
    let paced_argv = |url: &str| {
        let mut argv = wrk_argv(url, connections, plan.seconds, false);
        let at = argv.len() - 1;
        argv.splice(at..at, ["-s".to_owned(), pace_arg.clone()]);
        argv
    };
    let mut row = Row::new(
        "HTTP latency (p50 / p99)",
        format!(
            "wrk -t1 -c{connections} -d{}s --latency, each connection pausing 1 ms between requests: about half of tollgate's peak (at most {} req/s offered)",
            plan.seconds,
            connections * PACED_PER_CONNECTION as u32
        ),
        "ms",
    );
    let latency = |out: String| {
        let w = parse_wrk(&out);
        (w.p50_ms, w.p99_ms)
    };
    let mut direct = (Vec::new(), Vec::new());
    let mut proxied = (Vec::new(), Vec::new());
    let mut nginx_latency = (Vec::new(), Vec::new());
    for _ in 0..plan.rounds {
        let (p50, p99) = latency(must(run_direct(&paced_argv(&url(plain, "/"))), "wrk"));
        direct.0.push(p50);
        direct.1.push(p99);
        let (p50, p99) = latency(must(run_direct(&paced_argv(&url(peer, "/"))), "wrk"));
        nginx_latency.0.push(p50);
        nginx_latency.1.push(p99);
        let (p50, p99) = latency(must(governed(&paced_argv(&url(plain, "/"))), "wrk"));
        proxied.0.push(p50);
        proxied.1.push(p99);
    }
    let _ = std::fs::remove_file(&pace);
    for (name, (p50, p99)) in [("direct", direct), ("nginx", nginx_latency), ("tollgate", proxied)] {
        row.series.push(Series { name: format!("{name} p50"), samples: p50 });
        row.series.push(Series { name: format!("{name} p99"), samples: p99 });
    }
    let added = row.get("tollgate p99") - row.get("direct p99");
    row.ratios.push(Ratio::single("p99 added (ms)", added, "<= 1 ms"));
    // The peer at the same offered load: what a proxy's hop costs on this host.
    let added_by_nginx = row.get("nginx p99") - row.get("direct p99");
    row.ratios.push(Ratio::single("p99 added by nginx (ms)", added_by_nginx, "-"));
    rows.push(row);

    // New connections.
    let mut row = Row::new(
        "new connections per second",
        format!("wrk -t1 -c32 -d{}s -H 'Connection: close'", plan.seconds),
        "conn/s",
    );
    row.series.extend(interleaved(
        plan.rounds,
        &[
            ("direct", &|| wrk_rate(false, &url(plain, "/"), 32, true)),
            ("nginx", &|| wrk_rate(false, &url(peer, "/"), 32, true)),
            ("nginx, access log", &|| wrk_rate(false, &url(logging_peer, "/"), 32, true)),
            ("tollgate", &|| wrk_rate(true, &url(plain, "/"), 32, true)),
        ],
    ));
    row.ratio("tollgate / nginx", "tollgate", "nginx", ">= 1.0");
    row.ratio("tollgate / nginx, access log", "tollgate", "nginx, access log", "-");
    rows.push(row);

    // PostgreSQL.
    // `mode`: pgbench's `-M` (simple: each statement's text with its
    // constants; extended: one text, its values bound apart, as drivers send).
    let pgbench_argv = |port: u16, mode: &str| -> Vec<String> {
        [
            &pgbench,
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            &db.role,
            "-n",
            "-S",
            "-M",
            mode,
            "-c8",
            "-j2",
            "-T",
            &plan.seconds.to_string(),
            &db.name,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    };
    let tps = |out: String| {
        out.lines()
            .find_map(|l| l.strip_prefix("tps = ").and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()))
            .unwrap_or_else(|| panic!("pgbench printed no tps:\n{out}"))
    };
    let with_password = |argv: Vec<String>| {
        let mut command = Command::new(&argv[0]);
        command.args(&argv[1..]).env("PGPASSWORD", &secret.value);
        crate::run_with_timeout(&mut command, Duration::from_secs(120)).expect("pgbench")
    };
    // One row per protocol mode: direct, pgbouncer and tollgate taking turns.
    let pgbench_row = |what: &str, workload: String, mode: &str, target: &str| {
        let mut row = Row::new(what, workload, "tps");
        row.series.extend(interleaved(
            plan.rounds,
            &[
                ("direct", &|| tps(must(with_password(pgbench_argv(pg.port, mode)), "pgbench"))),
                ("pgbouncer", &|| tps(must(with_password(pgbench_argv(bouncer.port, mode)), "pgbench"))),
                ("tollgate", &|| tps(must(governed(&pgbench_argv(pg.port, mode)), "pgbench"))),
            ],
        ));
        row.ratio("tollgate / direct", "tollgate", "direct", target);
        row.ratio("pgbouncer / direct", "pgbouncer", "direct", "-");
        row
    };
    rows.push(pgbench_row(
        "PostgreSQL pgbench -S",
        format!(
            "pgbench -S -c8 -j2 -T{}, scale 1, TLS to pgbench on every path; tollgate with guardrails and masks; pgbouncer in session mode",
            plan.seconds
        ),
        "simple",
        ">= pgbouncer's",
    ));
    rows.push(pgbench_row(
        "PostgreSQL pgbench -S, extended protocol",
        format!(
            "pgbench -S -M extended -c8 -j2 -T{}: one statement text, its value bound apart, as drivers send; otherwise as above (for reference: no target of its own)",
            plan.seconds
        ),
        "extended",
        "-",
    ));

    // Exec and connect in a governed session.
    let loop_script = format!("i=0; while [ $i -lt {} ]; do /bin/true; i=$((i+1)); done", plan.execs);
    let timed = |argv: Vec<String>, inside: bool| {
        let started = Instant::now();
        let out = if inside { governed(&argv) } else { run_direct(&argv) };
        assert!(out.success(), "{out}");
        started.elapsed().as_secs_f64()
    };
    let sh = |script: &str| vec!["/bin/sh".to_owned(), "-c".to_owned(), script.to_owned()];
    let mut row = Row::new(
        "exec in a governed session",
        format!("{} x /bin/true from sh, governed vs not (session start included)", plan.execs),
        "s",
    );
    row.series.extend(interleaved(
        plan.rounds,
        &[("outside", &|| timed(sh(&loop_script), false)), ("governed", &|| timed(sh(&loop_script), true))],
    ));
    row.ratio("governed / outside", "governed", "outside", "<= 1.05");
    rows.push(row);
    // Every exec of the last governed round is recorded.
    let last = daemon.last_session_id();
    let show = daemon.show_until(&last, "every exec recorded", |show| {
        crate::session_log::events_of_kind(show, "exec").len() > plan.execs
    });
    let recorded = crate::session_log::events_of_kind(&show, "exec").len();

    // UDP connects: the same connect hook and record as TCP, without the
    // loopback handshake and TIME_WAIT, which otherwise decide the timing.
    let connect_script = format!(
        "import socket\nfor _ in range({}):\n    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n    s.connect(('127.0.0.1', {listen_port}))\n    s.close()\n",
        plan.connects
    );
    let python = |script: &str| vec!["python3".to_owned(), "-c".to_owned(), script.to_owned()];
    let mut row = Row::new(
        "connect in a governed session (allowed destination)",
        format!("{} UDP socket/connect/close loops from Python to a loopback port", plan.connects),
        "s",
    );
    row.series.extend(interleaved(
        plan.rounds,
        &[
            ("outside", &|| timed(python(&connect_script), false)),
            ("governed", &|| timed(python(&connect_script), true)),
        ],
    ));
    row.ratio("governed / outside", "governed", "outside", "<= 1.05");
    // The loop's own rate outside a session: no store can ingest its events faster.
    let loop_alone: Vec<f64> =
        row.find("outside").map_or_else(Vec::new, |s| s.samples.iter().map(|t| plan.connects as f64 / t).collect());
    rows.push(row);

    // Ingestion: a governed connect loop once more, timed until every one of
    // its connects is a row in the store. The store is watched through one
    // read-only connection with an indexed query, so that watching costs the
    // daemon nothing measurable (a sqlite3 process per look would take a
    // good part of a core from it).
    let store = daemon.state_dir().join("sessions.db");
    let db = rusqlite::Connection::open_with_flags(&store, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("the session log, read-only");
    db.busy_timeout(Duration::from_secs(5)).expect("a busy timeout");
    // One round: (events/s, connects stored).
    let ingest = || {
        let started = Instant::now();
        must(governed(&python(&connect_script)), "the connect loop");
        let session = daemon.last_session_id();
        let query = |sql: &str| -> usize {
            db.query_row(sql, [&session], |row| row.get::<_, i64>(0)).map_or(0, |n| n.max(0) as usize)
        };
        // Its last event's number, cheap to read, passes the number of connects
        // only once they are all stored (its other events are few); then the
        // connects are counted.
        let last_seq = || query("SELECT COALESCE(MAX(seq), 0) FROM events WHERE session_id = ?1");
        let count = || query("SELECT count(*) FROM events WHERE session_id = ?1 AND kind = 'connect'");
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline && (last_seq() < plan.connects || count() < plan.connects) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let elapsed = started.elapsed().as_secs_f64();
        let stored = count();
        (stored as f64 / elapsed, stored)
    };
    let rounds: Vec<(f64, usize)> = (0..plan.rounds).map(|_| ingest()).collect();
    let stored = rounds.iter().map(|&(_, stored)| stored).min().unwrap_or(0);
    let mut row = Row::new(
        "session log ingestion",
        format!(
            "a governed {n}-connect loop, from its start until its connects are rows in the store ({stored} of {n} stored, fewest of the rounds); and {recorded} of {} execs recorded in the exec row",
            plan.execs,
            n = plan.connects
        ),
        "events/s",
    );
    // One event per connect: the loop's connects/s outside are the events/s it could offer.
    const LOOP_ALONE: &str = "the same loop outside a session";
    row.series.push(Series { name: LOOP_ALONE.into(), samples: loop_alone });
    row.series.push(Series { name: "tollgate".into(), samples: rounds.iter().map(|&(rate, _)| rate).collect() });
    let rate = row.get("tollgate");
    row.ratios.push(Ratio::single("events/s", rate, ">= 100,000/s"));
    let ceiling = row.get(LOOP_ALONE);
    row.ratios.push(Ratio::single("of the loop's own rate", if ceiling > 0.0 { rate / ceiling } else { 0.0 }, "-"));
    rows.push(row);

    // Masking.
    let body_mb = big_body().len() as f64 / 1e6;
    let mut row = Row::new(
        "masking",
        format!(
            "wrk -t1 -c1 -d{}s GET of a {body_mb:.1} MB JSON body with 10 regex masks, through the proxy",
            plan.seconds
        ),
        "MB/s",
    );
    row.series.extend(interleaved(
        plan.rounds,
        &[
            ("direct", &|| wrk_rate(false, &url(masked10, "/big.json"), 1, false) * body_mb),
            ("tollgate, 10 masks", &|| wrk_rate(true, &url(masked10, "/big.json"), 1, false) * body_mb),
        ],
    ));
    let masked_rate = row.get("tollgate, 10 masks");
    row.ratios.push(Ratio::single("MB/s", masked_rate, ">= 200 MB/s per core"));
    rows.push(row);

    // The daemon with live sessions (after every other row).
    let mut sleepers = Vec::new();
    for _ in 0..plan.sessions {
        let mut command = Command::new(crate::tollgate_bin());
        command
            .args(["run", "--socket"])
            .arg(daemon.socket())
            .arg("--token-file")
            .arg(&token)
            .args(["--", "sleep", "30"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        sleepers.push(command.spawn().expect("a live session"));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while daemon.status()["sessions_active"].as_u64().unwrap_or(0) < plan.sessions as u64 {
        assert!(Instant::now() < deadline, "the live sessions did not all start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (busy_rss, busy_cpu) = sample(2.0);
    for mut sleeper in sleepers {
        // SAFETY: signalling the process group of a child we started.
        unsafe { libc::kill(-(sleeper.id() as i32), libc::SIGKILL) };
        let _ = sleeper.wait();
    }
    rows.push(Row {
        what: "the daemon at rest and with live sessions".into(),
        workload: format!(
            "RSS and CPU of the daemon over 2 s: at rest right after it started, and with {} live sessions after every other row",
            plan.sessions
        ),
        unit: String::new(),
        series: vec![
            Series { name: "RSS at rest (MB)".into(), samples: vec![rest_rss] },
            Series { name: "CPU at rest (% of a core)".into(), samples: vec![rest_cpu] },
            Series { name: format!("RSS, {} sessions (MB)", plan.sessions), samples: vec![busy_rss] },
            Series { name: format!("CPU, {} sessions (% of a core)", plan.sessions), samples: vec![busy_cpu] },
        ],
        ratios: vec![Ratio::single("RSS at rest (MB)", rest_rss, "<= 50 MB")],
    });

    let status = daemon.status();
    let lost = status["events_lost"].as_u64().unwrap_or(0);
    drop(bouncer);
    drop(nginx);
    Report { rows, machine: machine(), lost }
}

/// A series' name and how to take one of its measurements.
type Measure<'a> = (&'a str, &'a dyn Fn() -> f64);

/// `rounds` measurements of each of `measures`, taking turns (a, b, c, a,
/// b, c...): a host whose speed drifts during the run (a neighbour's load
/// on a shared machine) then weighs on every series alike, not on
/// whichever series ran while it lasted.
fn interleaved(rounds: usize, measures: &[Measure<'_>]) -> Vec<Series> {
    let mut series: Vec<Series> =
        measures.iter().map(|(name, _)| Series { name: (*name).to_owned(), samples: Vec::new() }).collect();
    for _ in 0..rounds {
        for ((_, measure), series) in measures.iter().zip(&mut series) {
            series.samples.push(measure());
        }
    }
    series
}

fn port() -> u16 {
    free_loopback_port().expect("a free port")
}

/// pgbouncer in session mode in front of the test server, as postgres.
struct Pgbouncer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Pgbouncer {
    fn start(pg_port: u16, database: &str, role: &str, password: &str) -> Pgbouncer {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = port();
        let p = |name: &str| dir.path().join(name);
        fs::write(p("users.txt"), format!("\"{role}\" \"{password}\"\n")).expect("userlist");
        // TLS to pgbench, as tollgate's proxy and the server speak it: pgbench
        // asks for it (sslmode prefer), and pgbouncer offers none by default.
        let pki = crate::pki::Pki::new(dir.path(), "IP:127.0.0.1,DNS:localhost");
        fs::write(
            p("pgbouncer.ini"),
            format!(
                "[databases]\n{database} = host=127.0.0.1 port={pg_port} dbname={database}\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = scram-sha-256\nauth_file = {users}\n\
                 pool_mode = session\nmax_client_conn = 100\ndefault_pool_size = 20\nunix_socket_dir =\nlogfile = {log}\n\
                 client_tls_sslmode = allow\nclient_tls_cert_file = {cert}\nclient_tls_key_file = {key}\n",
                users = p("users.txt").display(),
                log = p("pgbouncer.log").display(),
                cert = pki.cert.display(),
                key = pki.key.display(),
            ),
        )
        .expect("pgbouncer.ini");
        let (uid, gid) = owner_of(Path::new("/var/lib/postgresql"));
        for file in [p("users.txt"), p("pgbouncer.ini"), pki.cert.clone(), pki.key.clone()] {
            std::os::unix::fs::chown(file, Some(uid), Some(gid)).expect("chown");
        }
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown");
        let child = Command::new("pgbouncer")
            .arg(p("pgbouncer.ini"))
            .uid(uid)
            .gid(gid)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pgbouncer starts (cargo xtask setup installs it)");
        wait_for_port(port, "pgbouncer");
        Pgbouncer { child, port, _dir: dir }
    }
}

fn owner_of(path: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path).expect("the postgres user's home");
    (meta.uid(), meta.gid())
}

impl Drop for Pgbouncer {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Where a run's JSON goes: `target/bench/bench-UNIXTIME.json`.
pub fn json_path(root: &Path) -> PathBuf {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    root.join("target/bench").join(format!("bench-{now}.json"))
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::{Report, Row, Series, interleaved};

    #[test]
    fn rounds_take_turns_across_the_series() {
        let ran = RefCell::new(Vec::new());
        let a = || {
            ran.borrow_mut().push("a");
            ran.borrow().len() as f64
        };
        let b = || {
            ran.borrow_mut().push("b");
            ran.borrow().len() as f64
        };
        let series = interleaved(3, &[("a", &a), ("b", &b)]);
        assert_eq!(*ran.borrow(), ["a", "b", "a", "b", "a", "b"]);
        assert_eq!(series[0].name, "a");
        assert_eq!(series[0].samples, [1.0, 3.0, 5.0]);
        assert_eq!(series[1].name, "b");
        assert_eq!(series[1].samples, [2.0, 4.0, 6.0]);
    }

    fn compared(of: &[f64], over: &[f64]) -> Row {
        let mut row = Row::new("what", "workload", "req/s");
        row.series.push(Series { name: "over".into(), samples: over.to_vec() });
        row.series.push(Series { name: "of".into(), samples: of.to_vec() });
        row.ratio("of / over", "of", "over", ">= 1.0");
        row
    }

    #[test]
    fn a_ratio_compares_each_round_with_the_round_beside_it() {
        // The host was slow in the first round, for both series: round by
        // round the ratio is 0.8 twice and 1.1 once, though the medians
        // alone (100 over 100) say 1.0.
        let row = compared(&[40.0, 100.0, 110.0], &[50.0, 125.0, 100.0]);
        let ratio = &row.ratios[0];
        assert_eq!((ratio.value, ratio.spread), (0.8, Some((0.8, 1.1))));
        // Rounds that differ: the median of the rounds' ratios, and their range.
        let row = compared(&[90.0, 60.0, 120.0], &[100.0, 100.0, 100.0]);
        assert_eq!((row.ratios[0].value, row.ratios[0].spread), (0.9, Some((0.6, 1.2))));
        let table = Report { rows: vec![row], machine: "here".into(), lost: 0 }.table();
        assert!(table.contains("of / over: 0.90 (0.60-1.20) (>= 1.0)"), "{table}");
    }

    #[test]
    fn series_of_unequal_rounds_are_compared_by_their_medians() {
        let row = compared(&[50.0], &[100.0, 200.0, 400.0]);
        assert_eq!((row.ratios[0].value, row.ratios[0].spread), (0.25, None));
        let row = compared(&[50.0, 60.0], &[0.0, 100.0]);
        assert_eq!(row.ratios[0].value, 55.0 / 50.0, "a zero round cannot be paired");
    }
}
