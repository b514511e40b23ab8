//! Opening a governed PostgreSQL connection: the client's startup (TLS if
//! it asks, cancel requests, which parameters pass), and the proxy's own
//! login upstream with the route's credential.

use std::{net::SocketAddr, sync::Arc};

use bytes::{Bytes, BytesMut};
use postgres_protocol::{
    authentication::{
        md5_hash,
        sasl::{self, ChannelBinding, ScramSha256},
    },
    message::{backend, frontend},
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use super::wire::{self, Fields, Message};
use crate::{
    policy::route::Credential,
    proxy::{Governed, ProxyCtx, tls},
};

/// Either side's byte stream, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
/// A boxed stream.
pub type Stream = Box<dyn Io>;

/// What a client asked for when it connected.
pub enum Opening {
    /// A session with these startup parameters (the stream is TLS now if it asked).
    Session(Startup),
    /// A cancel request with the key the proxy gave out.
    Cancel {
        /// Process id of the key.
        pid: i32,
        /// Secret of the key.
        secret: i32,
    },
}

/// The startup parameters the proxy passes on.
#[derive(Debug, Clone)]
pub struct Startup {
    /// The user the client named (recorded; upstream the route's role logs in).
    pub user: String,
    /// The database.
    pub database: String,
    /// Other parameters, as given.
    pub passed: Vec<(String, String)>,
}

/// Why a client's startup was refused: sent to it as a FATAL error.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The socket failed or the packet was malformed.
    #[error("{0}")]
    Read(#[from] wire::ReadError),
    /// A malformed packet.
    #[error("{0}")]
    Malformed(#[from] wire::Malformed),
    /// Something the proxy does not pass (named in the message).
    #[error("{0}")]
    Refused(String),
}

/// Startup parameters passed upstream as given: they shape how values
/// look, not what statements do. Others (`options`, any setting by name)
/// would change the session's settings outside SQL, where no rule sees them.
const PASSED_PARAMETERS: &[&str] =
    &["application_name", "client_encoding", "datestyle", "timezone", "extra_float_digits", "intervalstyle"];

/// Reads the client's startup, answering SSL and GSSAPI requests on the way.
pub async fn open_client(tls: &ClientTls, stream: &mut Stream) -> Result<Opening, StartupError> {
    let mut encrypted = false;
    loop {
        let (code, body) = wire::read_startup(stream).await?;
        match code {
            wire::SSL_REQUEST if !encrypted => {
                let config = tls.config().map_err(StartupError::Refused)?;
                stream.write_all(b"S").await.map_err(wire::ReadError::from)?;
                // The plain stream goes into the TLS one; a placeholder holds its place meanwhile.
                let plain = std::mem::replace(stream, Box::new(tokio::io::duplex(1).0));
                let accepted = tokio_rustls::TlsAcceptor::from(config)
                    .accept(plain)
                    .await
                    .map_err(|e| StartupError::Refused(format!("TLS with the client failed: {e}")))?;
                *stream = Box::new(accepted);
                encrypted = true;
            }
            wire::GSS_REQUEST | wire::SSL_REQUEST => stream.write_all(b"N").await.map_err(wire::ReadError::from)?,
            wire::CANCEL_REQUEST => {
                let mut fields = Fields::new(&body);
                return Ok(Opening::Cancel { pid: fields.i32("CancelRequest")?, secret: fields.i32("CancelRequest")? });
            }
            code if code >> 16 == 3 => {
                let startup = parameters(&body)?;
                if code & 0xffff != 0 {
                    // A newer minor version: say which the proxy speaks.
                    let mut body = Vec::new();
                    body.extend_from_slice(&0i32.to_be_bytes());
                    body.extend_from_slice(&0i32.to_be_bytes());
                    stream.write_all(&wire::frame(b'v', &body)).await.map_err(wire::ReadError::from)?;
                }
                return Ok(Opening::Session(startup));
            }
            other => {
                return Err(StartupError::Refused(format!(
                    "unsupported frontend protocol {}.{}: the proxy speaks 3.0",
                    other >> 16,
                    other & 0xffff
                )));
            }
        }
    }
}

fn parameters(body: &Bytes) -> Result<Startup, StartupError> {
    let mut fields = Fields::new(body);
    let (mut user, mut database, mut passed) = (None, None, Vec::new());
    loop {
        let name = fields.cstr("StartupMessage")?;
        if name.is_empty() {
            break;
        }
        let value = fields.cstr("StartupMessage")?;
        match name.to_ascii_lowercase().as_str() {
            "user" => user = Some(value),
            "database" => database = Some(value),
            "replication" if ["false", "off", "no", "0"].contains(&value.to_ascii_lowercase().as_str()) => {}
            "replication" => {
                return Err(StartupError::Refused("replication connections are not governed by the proxy".to_owned()));
            }
            "options" if value.trim().is_empty() => {}
            // Protocol extensions the proxy does not speak; it says so after startup.
            lower if lower.starts_with("_pq_.") => {}
            lower if PASSED_PARAMETERS.contains(&lower) => passed.push((name, value)),
            _ => {
                return Err(StartupError::Refused(format!(
                    "startup parameter '{name}' would set server settings outside SQL, where no rule sees them; \
                     connect without it (PGOPTIONS included) and use SET"
                )));
            }
        }
    }
    let user = user.filter(|u| !u.is_empty()).ok_or_else(|| StartupError::Refused("no user name given".to_owned()))?;
    let database = database.filter(|d| !d.is_empty()).unwrap_or_else(|| user.clone());
    Ok(Startup { user, database, passed })
}

/// The certificate the proxy shows clients that insist on TLS: made once,
/// when the first one asks. The hop is local, so clients verify nothing
/// (`sslmode=require`); what it protects is the bytes on loopback.
#[derive(Default)]
pub struct ClientTls {
    config: std::sync::OnceLock<Result<Arc<rustls::ServerConfig>, String>>,
}

impl ClientTls {
    fn config(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        self.config.get_or_init(make_server_config).clone()
    }
}

fn make_server_config() -> Result<Arc<rustls::ServerConfig>, String> {
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    let certified = rcgen::generate_simple_self_signed(names).map_err(|e| format!("cannot make a certificate: {e}"))?;
    let certificate = CertificateDer::from(certified.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(vec![certificate], key)
        .map_err(|e| format!("cannot use the certificate: {e}"))?;
    Ok(Arc::new(config))
}

/// A logged-in upstream connection.
pub struct Upstream {
    /// The stream.
    pub stream: Stream,
    /// The server's cancel key.
    pub key: Option<(i32, i32)>,
    /// `ParameterStatus` (and notices) the server sent during login, for the client.
    pub greeting: Vec<Message>,
    /// Transaction status of the first `ReadyForQuery`.
    pub status: u8,
    /// The role that logged in.
    pub role: String,
}

/// Why the upstream login failed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The server said no; its error fields, for the client.
    #[error("the server refused the login: {0}")]
    Server(String, Vec<u8>),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl From<std::io::Error> for LoginError {
    fn from(e: std::io::Error) -> Self {
        Self::Other(format!("the upstream connection failed: {e}"))
    }
}

impl From<wire::ReadError> for LoginError {
    fn from(e: wire::ReadError) -> Self {
        Self::Other(format!("the upstream connection failed: {e}"))
    }
}

/// Opens the route's upstream (TLS if the route says so) and logs in: with
/// the route's credential, or, without one, as the client's user with
/// whatever the server asks of `client` relayed to it.
pub async fn login(
    ctx: &ProxyCtx,
    governed: &Governed,
    startup: &Startup,
    client: Option<&mut Stream>,
) -> Result<Upstream, LoginError> {
    let route = &governed.route.route;
    let tcp = TcpStream::connect(governed.destination).await?;
    let _ = tcp.set_nodelay(true);
    let mut stream: Stream = match &route.upstream_tls {
        Some(upstream_tls) => {
            let mut tcp = tcp;
            let mut request = BytesMut::new();
            frontend::ssl_request(&mut request);
            tcp.write_all(&request).await?;
            if tcp.read_u8().await? != b'S' {
                return Err(LoginError::Other("the upstream does not offer TLS, which the route requires".to_owned()));
            }
            Box::new(tls::connect_upstream(ctx, governed, upstream_tls, tcp).await.map_err(LoginError::Other)?)
        }
        None => Box::new(tcp),
    };
    let (role, password) = match &route.credential {
        Some(Credential::Login { user, password_file }) => {
            let password = ctx.credentials.password(&password_file.0).await.map_err(LoginError::Other)?;
            (user.clone(), Some(password))
        }
        _ => (startup.user.clone(), None),
    };
    let mut parameters: Vec<(&str, &str)> = vec![("user", &role), ("database", &startup.database)];
    parameters.extend(startup.passed.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut packet = BytesMut::new();
    frontend::startup_message(parameters, &mut packet)?;
    stream.write_all(&packet).await?;
    authenticate(&mut stream, &role, password.as_deref(), client).await?;

    let (mut key, mut greeting) = (None, Vec::new());
    loop {
        let message = next(&mut stream).await?;
        match message.tag {
            b'K' => {
                let mut fields = Fields::new(&message.body);
                let pid = fields.i32("BackendKeyData").map_err(|e| LoginError::Other(e.to_string()))?;
                key = Some((pid, fields.i32("BackendKeyData").map_err(|e| LoginError::Other(e.to_string()))?));
            }
            b'Z' => {
                let status = message.body.first().copied().unwrap_or(b'I');
                return Ok(Upstream { stream, key, greeting, status, role });
            }
            b'E' => return Err(server_error(&message)),
            _ => greeting.push(message),
        }
    }
}

async fn next(stream: &mut Stream) -> Result<Message, LoginError> {
    wire::read(stream, wire::MAX_SERVER_MESSAGE)
        .await?
        .ok_or_else(|| LoginError::Other("the upstream closed the connection during login".to_owned()))
}

fn server_error(message: &Message) -> LoginError {
    let fields = wire::error_fields(&message.body);
    let text = fields.iter().find(|(c, _)| *c == b'M').map(|(_, m)| m.clone()).unwrap_or_default();
    LoginError::Server(text, message.body.to_vec())
}

/// Answers the server's authentication requests until it says OK.
async fn authenticate(
    stream: &mut Stream,
    role: &str,
    password: Option<&str>,
    mut client: Option<&mut Stream>,
) -> Result<(), LoginError> {
    let mut scram: Option<ScramSha256> = None;
    loop {
        let message = next(stream).await?;
        if message.tag == b'E' {
            return Err(server_error(&message));
        }
        let mut framed = BytesMut::from(&message.encode()[..]);
        let parsed = backend::Message::parse(&mut framed)?
            .ok_or_else(|| LoginError::Other("a truncated authentication message".to_owned()))?;
        let Some(password) = password else {
            // No credential: the client answers the server itself.
            if matches!(parsed, backend::Message::AuthenticationOk) {
                return Ok(());
            }
            let client = client.as_deref_mut().ok_or_else(|| LoginError::Other("no client to authenticate".into()))?;
            client.write_all(&message.encode()).await?;
            let answer = wire::read(client, wire::MAX_STARTUP)
                .await?
                .filter(|m| m.tag == b'p')
                .ok_or_else(|| LoginError::Other("the client did not answer the server's authentication".into()))?;
            stream.write_all(&answer.encode()).await?;
            continue;
        };
        let mut out = BytesMut::new();
        match parsed {
            backend::Message::AuthenticationOk => return Ok(()),
            backend::Message::AuthenticationCleartextPassword => {
                frontend::password_message(password.as_bytes(), &mut out)?;
            }
            backend::Message::AuthenticationMd5Password(body) => {
                let hash = md5_hash(role.as_bytes(), password.as_bytes(), body.salt());
                frontend::password_message(hash.as_bytes(), &mut out)?;
            }
            backend::Message::AuthenticationSasl(_) => {
                // After the code: the mechanisms' names, each NUL-terminated.
                let offered = message
                    .body
                    .get(4..)
                    .unwrap_or_default()
                    .split(|b| *b == 0)
                    .any(|name| name == sasl::SCRAM_SHA_256.as_bytes());
                if !offered {
                    return Err(LoginError::Other("the upstream offers no SASL mechanism the proxy speaks".to_owned()));
                }
                let started = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                frontend::sasl_initial_response(sasl::SCRAM_SHA_256, started.message(), &mut out)?;
                scram = Some(started);
            }
            backend::Message::AuthenticationSaslContinue(body) => {
                let state = scram.as_mut().ok_or_else(|| LoginError::Other("SASL out of order".to_owned()))?;
                state.update(body.data())?;
                frontend::sasl_response(state.message(), &mut out)?;
            }
            backend::Message::AuthenticationSaslFinal(body) => {
                let state = scram.as_mut().ok_or_else(|| LoginError::Other("SASL out of order".to_owned()))?;
                state.finish(body.data()).map_err(|e| LoginError::Other(format!("the server's SCRAM proof: {e}")))?;
                continue;
            }
            _ => {
                return Err(LoginError::Other(
                    "the upstream asks for an authentication the proxy does not speak".into(),
                ));
            }
        }
        stream.write_all(&out).await?;
    }
}

/// Sends a cancel request for the server key `(pid, secret)` to `upstream`.
pub async fn cancel(upstream: SocketAddr, pid: i32, secret: i32) -> std::io::Result<()> {
    let mut tcp = TcpStream::connect(upstream).await?;
    tcp.write_all(&wire::cancel_request(pid, secret)).await?;
    // The server closes the connection when it has read the request.
    let mut rest = Vec::new();
    let _ = tcp.read_to_end(&mut rest).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(pairs: &[(&str, &str)]) -> Bytes {
        let mut body = Vec::new();
        for (k, v) in pairs {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        Bytes::from(body)
    }

    #[test]
    fn settings_outside_sql_are_refused_by_name() {
        let startup = parameters(&packet(&[("user", "agent"), ("application_name", "psql")])).expect("fine");
        assert_eq!((startup.user.as_str(), startup.database.as_str()), ("agent", "agent"));
        for (name, value) in [("options", "-c search_path=audit"), ("search_path", "audit"), ("replication", "true")] {
            let refused = parameters(&packet(&[("user", "agent"), (name, value)]));
            assert!(matches!(refused, Err(StartupError::Refused(ref m)) if m.contains(name)), "{name}: {refused:?}");
        }
        assert!(parameters(&packet(&[("database", "x")])).is_err(), "no user");
        assert!(parameters(&Bytes::from_static(b"user\0agent")).is_err(), "unterminated");
    }
}
