//! `cargo xtask bench`: the latency of small keep-alive exchanges through the
//! proxy against the same exchanges straight to the server, in one run.
//! 200 sequential GETs with Python `requests` on one connection, to a real
//! nginx, after 20 to warm up; the medians and their difference are printed.
//! Speed is measured here, never asserted in the test suite.

use std::fs;
use std::net::TcpListener;
use std::process::{Child, Command};
use std::time::Duration;

use harness::Daemon;
use harness::proxy::{BUILD_BOTS, policy};

const REQUESTS: usize = 200;

const CLIENT: &str = r#"
import requests, statistics, sys, time
url = sys.argv[1]
s = requests.Session()
for _ in range(20):
    s.get(url).content
times = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter()
    r = s.get(url)
    r.content
    times.append((time.perf_counter() - t) * 1000)
    assert r.status_code == 200, r.status_code
print("%.3f" % statistics.median(times))
"#;

struct Nginx {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start() -> Nginx {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let p = |name: &str| dir.path().join(name).display().to_string();
        fs::create_dir(dir.path().join("tmp")).expect("tmp");
        let config = format!(
            "daemon off;\nworker_processes 1;\nerror_log {err};\npid {pid};\nevents {{ worker_connections 64; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {tmp};\n  proxy_temp_path {tmp};\n  fastcgi_temp_path {tmp};\n  uwsgi_temp_path {tmp};\n  scgi_temp_path {tmp};\n  keepalive_requests 100000;\n  server {{\n    listen 127.0.0.1:{port};\n    location / {{ default_type application/json; return 200 '{{\"ok\":true}}'; }}\n  }}\n}}\n",
            err = p("error.log"),
            pid = p("nginx.pid"),
            tmp = p("tmp"),
        );
        fs::write(dir.path().join("nginx.conf"), config).expect("config");
        let child = Command::new("nginx")
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .spawn()
            .expect("nginx starts (cargo xtask setup installs it)");
        std::thread::sleep(Duration::from_millis(300));
        Nginx { child, port, _dir: dir }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM to the master stops its workers too; SIGKILL would orphan them.
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn main() {
    let nginx = Nginx::start();
    let route = format!("        - to: \"127.0.0.1/32:{}\"\n          protocol: http\n", nginx.port);
    let daemon = Daemon::start(&policy(&route, ""));
    let token = daemon.mint("bench-bot", BUILD_BOTS);
    let url = format!("http://127.0.0.1:{}/", nginx.port);
    let count = REQUESTS.to_string();
    let direct = Command::new("python3").args(["-c", CLIENT, url.as_str(), count.as_str()]).output().expect("python3");
    let direct: f64 = String::from_utf8_lossy(&direct.stdout).trim().parse().expect("a median from the direct run");
    let proxied = daemon.run(&token, &["python3", "-c", CLIENT, url.as_str(), count.as_str()]);
    let proxied: f64 =
        proxied.stdout.trim().parse().unwrap_or_else(|_| panic!("no median through the proxy: {proxied}"));
    println!("keep-alive GET, {REQUESTS} sequential requests, median latency:");
    println!("  direct to nginx      {direct:8.3} ms");
    println!("  through the proxy    {proxied:8.3} ms");
    println!("  proxy overhead       {:8.3} ms ({:.2}x)", proxied - direct, proxied / direct);
}
