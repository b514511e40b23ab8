//! Token verification: tokens from configured issuers (JWKS from a file or from a URL) start
//! sessions; every kind of bad token is refused with a specific reason before the command runs.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use harness::jwt::{KID, SigningKey};
use harness::session_log::pretty;
use harness::{Daemon, Issuer, Jwks, unique_tag};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// Issuer whose keys the daemon reads from a JWKS file.
const FILE_ISSUER: &str = "https://idp.test.example";
/// Issuer whose keys the daemon fetches from a JWKS URL.
const URL_ISSUER: &str = "https://idp-url.test.example";
const AUDIENCE: &str = "tollgate";
/// How `tollgate run` starts its one line of stderr for a refused token.
const REJECTED_PREFIX: &str = "tollgate: token rejected: ";

const POLICY: &str = r#"
identities:
  - name: file-issued
    issuer: https://idp.test.example
    allow_root: true
    claims:
      repository_owner: acme
  - name: url-issued
    issuer: https://idp-url.test.example
    allow_root: true
    claims:
      repository_owner: acme
grants:
  - name: file-issued-egress
    identity: file-issued
    network:
      allow: ["127.0.0.0/8"]
  - name: url-issued-egress
    identity: url-issued
    network:
      allow: ["127.0.0.0/8"]
"#;

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("the clock is after 1970").as_secs()
}

/// Claims that `POLICY` maps to an identity for `issuer`, valid for the next ten minutes.
fn valid_claims(issuer: &str, sub: &str) -> Value {
    let now = unix_now();
    json!({
        "iss": issuer,
        "aud": AUDIENCE,
        "sub": sub,
        "iat": now,
        "exp": now + 600,
        "repository_owner": "acme",
    })
}

/// `valid_claims` with some fields replaced.
fn claims_with(issuer: &str, changes: Value) -> Value {
    let mut claims = valid_claims(issuer, "token-test");
    let (Some(claims_map), Value::Object(changes)) = (claims.as_object_mut(), changes) else {
        panic!("test bug: claims and their changes must be JSON objects");
    };
    claims_map.extend(changes);
    claims
}

/// A minimal HTTP server on 127.0.0.1 that serves a JWKS at /jwks and counts requests for it.
struct JwksServer {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl JwksServer {
    fn start(jwks: String) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the JWKS server");
        let addr = listener.local_addr().expect("reading the JWKS server's address");
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = thread::spawn({
            let requests = Arc::clone(&requests);
            let stop = Arc::clone(&stop);
            move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let served = stream.and_then(|stream| serve_jwks(stream, &jwks, &requests));
                    if let Err(err) = served {
                        eprintln!("JWKS server on {addr}: {err}");
                    }
                }
            }
        });
        JwksServer { addr, requests, stop, thread: Some(thread) }
    }

    fn url(&self) -> String {
        format!("http://{}/jwks", self.addr)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // The thread is blocked in accept; a connection wakes it up to see the flag. If the
        // connect fails the thread is already gone.
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Answers one HTTP request: the JWKS for GET /jwks, 404 otherwise.
fn serve_jwks(mut stream: TcpStream, jwks: &str, requests: &AtomicUsize) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut request = Vec::new();
    let mut buffer = [0u8; 1024];
    // Read the request head; a JWKS fetch has no body.
    while !request.windows(4).any(|window| window == b"\r\n\r\n") && request.len() < 16 * 1024 {
        let read = stream.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        request.extend_from_slice(&buffer[..read]);
    }
    let head = String::from_utf8_lossy(&request);
    let mut request_line = head.lines().next().unwrap_or_default().split(' ');
    let (method, path) = (request_line.next(), request_line.next());
    let response = if method == Some("GET") && path == Some("/jwks") {
        requests.fetch_add(1, Ordering::SeqCst);
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{jwks}",
            jwks.len()
        )
    } else {
        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
    };
    stream.write_all(response.as_bytes())
}

#[test]
fn tokens_from_jwks_file_and_jwks_url_issuers_start_sessions() {
    let file_key = SigningKey::generate();
    let url_key = SigningKey::generate();
    let server = JwksServer::start(url_key.jwks());
    // Without the dev issuer, as a production host would run.
    let daemon = Daemon::builder()
        .dev_issuer(false)
        .policy(POLICY)
        .issuer(Issuer {
            issuer: FILE_ISSUER.to_owned(),
            audience: AUDIENCE.to_owned(),
            jwks: Jwks::Json(file_key.jwks()),
        })
        .issuer(Issuer { issuer: URL_ISSUER.to_owned(), audience: AUDIENCE.to_owned(), jwks: Jwks::Url(server.url()) })
        .start();

    for (issuer, key, identity) in [(FILE_ISSUER, &file_key, "file-issued"), (URL_ISSUER, &url_key, "url-issued")] {
        let subject = format!("{identity}-subject");
        let token = daemon.write_token(&key.sign(&valid_claims(issuer, &subject)));
        let marker = format!("ran-{}", unique_tag());
        let script = format!(r#"echo "$TOLLGATE_SESSION"; echo {marker}"#);
        let out = daemon.run(&token, &["/bin/sh", "-c", script.as_str()]);
        assert_eq!(out.code(), Some(0), "a valid token from {issuer} was not accepted: {out}");
        assert!(out.has_stdout_line(&marker), "the command's output is missing ({issuer}): {out}");

        let session = daemon.session(out.first_line());
        let context = pretty(&session);
        assert_eq!(session["issuer"], issuer, "session issuer:\n{context}");
        assert_eq!(session["identity"], identity, "session identity:\n{context}");
        assert_eq!(session["subject"], subject.as_str(), "session subject:\n{context}");
    }
    assert!(
        server.requests() >= 1,
        "the daemon accepted a {URL_ISSUER} token without fetching its JWKS from {}",
        server.url()
    );
}

#[test]
fn bad_tokens_are_rejected_before_the_command_starts() {
    let key = SigningKey::generate();
    // Same kid as the trusted key, so only the signature check can tell them apart.
    let impostor = SigningKey::generate();
    let daemon = Daemon::builder()
        .policy(POLICY)
        .issuer(Issuer { issuer: FILE_ISSUER.to_owned(), audience: AUDIENCE.to_owned(), jwks: Jwks::Json(key.jwks()) })
        .start();

    let now = unix_now();
    let valid = valid_claims(FILE_ISSUER, "token-test");
    let unsigned =
        format!("{}.{}.", URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#), URL_SAFE_NO_PAD.encode(valid.to_string()));
    // The classic algorithm-confusion attack: HMAC keyed with the issuer's public key.
    let mut hs256_header = Header::new(Algorithm::HS256);
    hs256_header.kid = Some(KID.to_owned());
    let hs256 = jsonwebtoken::encode(&hs256_header, &valid, &EncodingKey::from_secret(&key.public))
        .expect("signing the HS256 token");

    let cases: [(&str, String, &str); 10] = [
        ("expired", key.sign(&claims_with(FILE_ISSUER, json!({"iat": now - 1200, "exp": now - 600}))), "expired"),
        (
            "not yet valid",
            key.sign(&claims_with(FILE_ISSUER, json!({"nbf": now + 600, "exp": now + 1200}))),
            "not yet valid",
        ),
        (
            "unknown issuer",
            key.sign(&claims_with(FILE_ISSUER, json!({"iss": "https://unknown.test.example"}))),
            "unknown issuer",
        ),
        ("wrong audience", key.sign(&claims_with(FILE_ISSUER, json!({"aud": "someone-else"}))), "audience"),
        ("wrong key", impostor.sign(&valid), "signature"),
        ("alg none", unsigned, "none"),
        ("HS256", hs256, "HS256"),
        ("garbage", "this is not a JWT".to_owned(), "malformed"),
        // Over the size limit: refused by the client before the daemon parses anything.
        ("oversized", format!("{}.{}.{}", "e".repeat(40_000), "e".repeat(40_000), "e".repeat(40_000)), "65536 bytes"),
        (
            "no matching identity",
            key.sign(&claims_with(FILE_ISSUER, json!({"repository_owner": "intruder"}))),
            "no matching identity",
        ),
    ];

    let mut failures = Vec::new();
    for (case, jwt, reason) in cases {
        let token = daemon.write_token(&jwt);
        // The command would leave this file behind if it ever ran.
        let marker = daemon.dir().join(format!("started-{}", case.replace(' ', "-")));
        let out = daemon.run(&token, &[Path::new("/usr/bin/touch"), marker.as_path()]);

        let stderr = out.stderr.trim_end();
        let mut problems = Vec::new();
        if out.code() != Some(2) {
            problems.push("exit status is not 2".to_owned());
        }
        match stderr.strip_prefix(REJECTED_PREFIX) {
            Some(given) if !stderr.contains('\n') => {
                if !given.to_lowercase().contains(&reason.to_lowercase()) {
                    problems.push(format!("the reason does not mention {reason:?}"));
                }
            }
            _ => problems.push(format!("stderr is not one `{REJECTED_PREFIX}<reason>` line")),
        }
        if !out.stdout.is_empty() {
            problems.push("something was printed on stdout".to_owned());
        }
        if marker.exists() {
            problems.push("the command ran".to_owned());
        }
        if !problems.is_empty() {
            failures.push(format!("{case}: {}\n{out}", problems.join("; ")));
        }
    }
    assert!(failures.is_empty(), "bad tokens were mishandled:\n\n{}", failures.join("\n\n"));

    let sessions = daemon.sessions();
    assert!(sessions.is_empty(), "rejected tokens must not create sessions:\n{}", pretty(&Value::Array(sessions)));
}

/// The dev issuer's tokens are trusted only where the config says
/// `dev_issuer: true`: a packaged host refuses them even though the key exists.
#[test]
fn dev_tokens_are_refused_unless_the_config_trusts_the_dev_issuer() {
    let daemon = Daemon::builder().dev_issuer(false).policy(POLICY).start();
    let token = daemon.mint("dev-subject", &[]);
    let marker = daemon.dir().join(format!("ran-{}", unique_tag()));
    let script = format!("touch {}", marker.display());
    let out = daemon.run(&token, &["/bin/sh", "-c", script.as_str()]);
    assert_eq!(out.code(), Some(2), "a dev token was accepted without dev_issuer: true: {out}");
    assert!(
        out.stderr.starts_with(REJECTED_PREFIX) && out.stderr.contains("unknown issuer 'tollgate-dev'"),
        "the refusal does not name the untrusted issuer: {out}"
    );
    assert!(!marker.exists(), "the command ran although its token was refused");
    assert!(daemon.sessions().is_empty(), "a refused token left a session record");
}
