//! A small HTTP/1.1 server on loopback that records every request it receives, for the proxy
//! tests to check what actually reached the upstream (and what did not).
//!
//! One thread, `std::net` only. Every response carries `Connection: close` and the connection is
//! closed after it, so one slow client can hold up others for at most [`READ_TIMEOUT`]. Request
//! bodies are read by `Content-Length` (the proxy always sends one).

use std::fmt;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long the server waits for a request's bytes before dropping the connection.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the accept loop checks whether it should stop.
const ACCEPT_POLL: Duration = Duration::from_millis(10);
/// Requests larger than this are answered with 413 and recorded without their body.
const MAX_BODY: usize = 1 << 20;

/// One request as the upstream received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// The request target (path and query).
    pub path: String,
    /// Headers in the order received, names as sent.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    /// Every value of header `name` (case-insensitive), in order.
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_str()).collect()
    }

    /// The body as text (lossy).
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl fmt::Display for Recorded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} {}", self.method, self.path)?;
        for (name, value) in &self.headers {
            writeln!(f, "  {name}: {value}")?;
        }
        write!(f, "  body: {:?}", self.body_text())
    }
}

/// What the server answers every request with.
#[derive(Clone)]
struct Reply {
    status: u16,
    /// Header lines (`Name: value`); Content-Length and Connection are added.
    headers: Vec<String>,
    body: Vec<u8>,
}

impl Reply {
    fn json(status: u16, body: &str) -> Reply {
        Reply { status, headers: vec!["Content-Type: application/json".to_owned()], body: body.as_bytes().to_vec() }
    }
}

#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<Recorded>>,
    reply: Mutex<Option<Reply>>,
    connections: AtomicUsize,
    stop: AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic on the server thread must not hide what was recorded before it.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The recording HTTP server. Stops when dropped.
pub struct Upstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    /// Listens on `ip` ("127.0.0.1" or "::1") at a kernel-chosen port and answers every request
    /// with `status` and the JSON `body`.
    pub fn start(ip: &str, status: u16, body: &str) -> Upstream {
        let ip: IpAddr = ip.parse().unwrap_or_else(|err| panic!("bad upstream address {ip:?}: {err}"));
        let listener = TcpListener::bind((ip, 0)).unwrap_or_else(|err| panic!("binding the upstream on {ip}: {err}"));
        listener.set_nonblocking(true).unwrap_or_else(|err| panic!("making the upstream listener non-blocking: {err}"));
        let addr = listener.local_addr().unwrap_or_else(|err| panic!("reading the upstream's address: {err}"));
        let shared = Arc::new(Shared::default());
        *lock(&shared.reply) = Some(Reply::json(status, body));
        let thread = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("upstream-{addr}"))
                .spawn(move || serve(&listener, &shared))
                .unwrap_or_else(|err| panic!("spawning the upstream thread: {err}"))
        };
        Upstream { addr, shared, thread: Some(thread) }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://ADDR:PORT` (IPv6 addresses in brackets), for URLs.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes what later requests are answered with.
    pub fn set_reply(&self, status: u16, body: &str) {
        *lock(&self.shared.reply) = Some(Reply::json(status, body));
    }

    /// Answers later requests with these header lines (`Name: value`, as
    /// sent: duplicates and all) and body bytes.
    pub fn set_raw_reply(&self, status: u16, headers: &[&str], body: &[u8]) {
        let headers = headers.iter().map(|line| (*line).to_owned()).collect();
        *lock(&self.shared.reply) = Some(Reply { status, headers, body: body.to_vec() });
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.requests).clone()
    }

    /// How many TCP connections the server has accepted (whether or not a request followed).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// The requests as "METHOD PATH" lines, for compact assertions.
    pub fn request_lines(&self) -> Vec<String> {
        self.requests().iter().map(|request| format!("{} {}", request.method, request.path)).collect()
    }

    /// All recorded requests, formatted for failure messages.
    pub fn describe(&self) -> String {
        let requests = self.requests();
        if requests.is_empty() {
            return format!("upstream {} received no requests ({} connections)", self.addr, self.connections());
        }
        let mut text = format!("upstream {} received {} request(s):", self.addr, requests.len());
        for request in requests {
            text.push('\n');
            text.push_str(&request.to_string());
        }
        text
    }

    /// Waits up to `timeout` for a request satisfying `done`, and returns it.
    pub fn wait_for(&self, what: &str, timeout: Duration, done: impl Fn(&Recorded) -> bool) -> Recorded {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.requests().into_iter().find(|request| done(request)) {
                return found;
            }
            assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}; {}", self.describe());
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            // A panic on the server thread already failed whatever relied on it.
            let _ = thread.join();
        }
    }
}

fn serve(listener: &TcpListener, shared: &Shared) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                shared.connections.fetch_add(1, Ordering::SeqCst);
                // A broken connection is the client's problem; the server carries on.
                let _ = handle(stream, shared);
            }
            Err(err) if err.kind() == ErrorKind::WouldBlock => thread::sleep(ACCEPT_POLL),
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(err) => panic!("upstream accept failed: {err}"),
        }
    }
}

/// Reads one request, records it, answers it and closes the connection.
fn handle(stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    stream.set_write_timeout(Some(READ_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);

    let mut request_line = String::new();
    if reader.read_line(&mut request_line)? == 0 {
        return Ok(()); // connected and closed without a request
    }
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return respond(&stream, &Reply::json(400, r#"{"error":"bad request line"}"#));
    };
    let (method, path) = (method.to_owned(), path.to_owned());

    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(()); // closed in the middle of the headers
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
    }

    let length = headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = Vec::new();
    let too_large = length > MAX_BODY;
    if !too_large {
        body.resize(length, 0);
        reader.read_exact(&mut body)?;
    }
    lock(&shared.requests).push(Recorded { method, path, headers, body });

    if too_large {
        return respond(&stream, &Reply::json(413, r#"{"error":"body too large for the test upstream"}"#));
    }
    let reply = lock(&shared.reply).clone().unwrap_or_else(|| Reply::json(200, "{}"));
    respond(&stream, &reply)
}

fn respond(mut stream: &TcpStream, reply: &Reply) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {} {}\r\n", reply.status, reason(reply.status));
    for line in &reply.headers {
        head.push_str(line);
        head.push_str("\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\nConnection: close\r\n\r\n", reply.body.len()));
    stream.write_all(head.as_bytes())?;
    stream.write_all(&reply.body)?;
    stream.flush()?;
    stream.shutdown(std::net::Shutdown::Both)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        _ => "Status",
    }
}
