//! Framing of PostgreSQL protocol v3 messages: reading them whole with a
//! size bound, taking their fields apart, and writing the few the proxy
//! speaks itself (errors, authentication, readiness).
//!
//! Messages the server sends are parsed with `postgres-protocol`; the
//! client's are taken apart here (that crate only writes them).

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest message the proxy takes from a client (a statement with its
/// parameters); past it the connection gets an error and is closed.
pub const MAX_CLIENT_MESSAGE: usize = 64 << 20;
/// Largest message from the server (PostgreSQL's own limit on a value is 1 GB).
pub const MAX_SERVER_MESSAGE: usize = (1 << 30) + (1 << 20);
/// Largest startup packet (PostgreSQL refuses more than 10,000 bytes).
pub const MAX_STARTUP: usize = 10_000;

/// The codes of the special startup packets.
pub const SSL_REQUEST: i32 = 80_877_103;
/// Asks for GSSAPI encryption (answered: not offered).
pub const GSS_REQUEST: i32 = 80_877_104;
/// Asks the server to cancel a running query.
pub const CANCEL_REQUEST: i32 = 80_877_102;

/// One message: its type byte and body (without the length).
#[derive(Debug, Clone)]
pub struct Message {
    /// Type byte.
    pub tag: u8,
    /// Body.
    pub body: Bytes,
}

impl Message {
    /// The message as it goes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        frame(self.tag, &self.body)
    }

    /// Appends the message as it goes on the wire to `out` (the relay's
    /// path: no buffer of its own per message).
    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.push(self.tag);
        out.extend_from_slice(&(self.body.len() as i32 + 4).to_be_bytes());
        out.extend_from_slice(&self.body);
    }
}

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A length outside the protocol's bounds.
    #[error("a message of {length} bytes (type '{tag}') is over the limit of {limit} bytes or malformed")]
    Length {
        /// Type byte, as a character.
        tag: char,
        /// The declared length.
        length: i64,
        /// The bound.
        limit: usize,
    },
}

/// Reads one typed message; `None` at a clean end of stream.
pub async fn read<R: AsyncRead + Unpin>(reader: &mut R, limit: usize) -> Result<Option<Message>, ReadError> {
    let tag = match reader.read_u8().await {
        Ok(tag) => tag,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let length = reader.read_i32().await?;
    if length < 4 || length as usize - 4 > limit {
        return Err(ReadError::Length { tag: char::from(tag), length: length.into(), limit });
    }
    let mut body = vec![0; length as usize - 4];
    reader.read_exact(&mut body).await?;
    Ok(Some(Message { tag, body: Bytes::from(body) }))
}

/// Reads a startup packet: its code and what follows it.
pub async fn read_startup<R: AsyncRead + Unpin>(reader: &mut R) -> Result<(i32, Bytes), ReadError> {
    let length = reader.read_i32().await?;
    if !(8..=MAX_STARTUP as i32).contains(&length) {
        return Err(ReadError::Length { tag: '-', length: length.into(), limit: MAX_STARTUP });
    }
    let code = reader.read_i32().await?;
    let mut body = vec![0; length as usize - 8];
    reader.read_exact(&mut body).await?;
    Ok((code, Bytes::from(body)))
}

/// A typed message on the wire.
pub fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(tag);
    out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Takes a client message's fields apart; every read is bounds-checked.
pub struct Fields(Bytes);

/// A client message that does not hold what its type says.
#[derive(Debug, thiserror::Error)]
pub enum Malformed {
    #[error("malformed {0} message")]
    Message(&'static str),
    #[error(
        "the {0} message names a prepared statement or portal in characters other than ASCII, \
         which the server may read as a longer name, cut short where the proxy would not"
    )]
    Name(&'static str),
}

/// The longest name of a prepared statement or portal the server keeps
/// whole (NAMEDATALEN - 1): it compares only this much of a longer one.
pub const MAX_NAME: usize = 63;

/// A name as the server keeps it (its first [`MAX_NAME`] bytes), so two
/// names it takes for one are one to the proxy too. `None` if it is not
/// ASCII: in the server's encoding it may have more bytes.
pub fn server_name(name: &str) -> Option<&str> {
    name.is_ascii().then(|| &name[..name.len().min(MAX_NAME)])
}

impl Fields {
    /// Over `body`.
    pub fn new(body: &Bytes) -> Self {
        Self(body.clone())
    }

    /// A NUL-terminated UTF-8 string.
    pub fn cstr(&mut self, what: &'static str) -> Result<String, Malformed> {
        let end = self.0.iter().position(|b| *b == 0).ok_or(Malformed::Message(what))?;
        let text = std::str::from_utf8(&self.0[..end]).map_err(|_| Malformed::Message(what))?.to_owned();
        self.0.advance(end + 1);
        Ok(text)
    }

    /// The name of a prepared statement or portal, as the server keeps it.
    pub fn name(&mut self, what: &'static str) -> Result<String, Malformed> {
        let name = self.cstr(what)?;
        server_name(&name).map(str::to_owned).ok_or(Malformed::Name(what))
    }

    /// A byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, Malformed> {
        if self.0.is_empty() {
            return Err(Malformed::Message(what));
        }
        Ok(self.0.get_u8())
    }

    /// A 16-bit count or code.
    pub fn i16(&mut self, what: &'static str) -> Result<i16, Malformed> {
        if self.0.len() < 2 {
            return Err(Malformed::Message(what));
        }
        Ok(self.0.get_i16())
    }

    /// A 32-bit number.
    pub fn i32(&mut self, what: &'static str) -> Result<i32, Malformed> {
        if self.0.len() < 4 {
            return Err(Malformed::Message(what));
        }
        Ok(self.0.get_i32())
    }

    /// A length-prefixed value (`None` for SQL NULL).
    pub fn value(&mut self, what: &'static str) -> Result<Option<Bytes>, Malformed> {
        let length = self.i32(what)?;
        if length < 0 {
            return Ok(None);
        }
        if self.0.len() < length as usize {
            return Err(Malformed::Message(what));
        }
        Ok(Some(self.0.split_to(length as usize)))
    }
}

/// `ErrorResponse` with severity ERROR.
pub fn error(code: &str, message: &str, detail: Option<&str>) -> Vec<u8> {
    error_with("ERROR", code, message, detail)
}

/// `ErrorResponse` with severity FATAL (the connection ends after it).
pub fn fatal(code: &str, message: &str) -> Vec<u8> {
    error_with("FATAL", code, message, None)
}

fn error_with(severity: &str, code: &str, message: &str, detail: Option<&str>) -> Vec<u8> {
    let mut fields = vec![(b'S', severity), (b'V', severity), (b'C', code), (b'M', message)];
    fields.extend(detail.map(|detail| (b'D', detail)));
    let fields: Vec<(u8, String)> = fields.into_iter().map(|(code, text)| (code, text.to_owned())).collect();
    frame(b'E', &error_body(&fields))
}

/// The fields of an `ErrorResponse` or `NoticeResponse`, by code.
pub fn error_fields(body: &[u8]) -> Vec<(u8, String)> {
    let mut fields = Vec::new();
    let mut rest = body;
    while let Some((&code, tail)) = rest.split_first() {
        if code == 0 {
            break;
        }
        let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
        fields.push((code, String::from_utf8_lossy(&tail[..end]).into_owned()));
        rest = tail.get(end + 1..).unwrap_or_default();
    }
    fields
}

/// An `ErrorResponse` or `NoticeResponse` body from its fields.
pub fn error_body(fields: &[(u8, String)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (code, value) in fields {
        body.push(*code);
        body.extend_from_slice(value.replace('\0', "").as_bytes());
        body.push(0);
    }
    body.push(0);
    body
}

/// `AuthenticationOk`.
pub fn authentication_ok() -> Vec<u8> {
    frame(b'R', &0i32.to_be_bytes())
}

/// `BackendKeyData`.
pub fn backend_key(pid: i32, secret: i32) -> Vec<u8> {
    let mut body = Vec::with_capacity(8);
    body.extend_from_slice(&pid.to_be_bytes());
    body.extend_from_slice(&secret.to_be_bytes());
    frame(b'K', &body)
}

/// `ReadyForQuery` with a transaction status (`I`, `T` or `E`).
pub fn ready(status: u8) -> Vec<u8> {
    frame(b'Z', &[status])
}

/// A client `Query`.
pub fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    frame(b'Q', &body)
}

/// A client `Parse` of `sql` as `statement`, with no parameter types.
pub fn parse(statement: &str, sql: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(statement.as_bytes());
    body.push(0);
    body.extend_from_slice(sql.as_bytes());
    body.push(0);
    body.extend_from_slice(&0i16.to_be_bytes());
    frame(b'P', &body)
}

/// A client `Describe` of a portal.
pub fn describe_portal(portal: &str) -> Vec<u8> {
    let mut body = vec![b'P'];
    body.extend_from_slice(portal.as_bytes());
    body.push(0);
    frame(b'D', &body)
}

/// A `CancelRequest` packet.
pub fn cancel_request(pid: i32, secret: i32) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    out.extend_from_slice(&16i32.to_be_bytes());
    out.extend_from_slice(&CANCEL_REQUEST.to_be_bytes());
    out.extend_from_slice(&pid.to_be_bytes());
    out.extend_from_slice(&secret.to_be_bytes());
    out
}

/// A `DataRow` body from its values.
pub fn data_row(values: &[Option<Vec<u8>>]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(values.len() as i16).to_be_bytes());
    for value in values {
        match value {
            Some(bytes) => {
                body.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
                body.extend_from_slice(bytes);
            }
            None => body.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lengths_outside_the_bounds_are_refused_before_reading_them() {
        let mut short: &[u8] = &[b'Q', 0, 0, 0, 2];
        assert!(matches!(read(&mut short, 100).await, Err(ReadError::Length { .. })));
        let mut long: &[u8] = &[b'Q', 0x7f, 0xff, 0xff, 0xff];
        assert!(matches!(read(&mut long, 100).await, Err(ReadError::Length { .. })));
        let mut fine: &[u8] = &frame(b'Q', b"SELECT 1\0");
        let message = read(&mut fine, 100).await.expect("reads").expect("a message");
        assert_eq!((message.tag, &message.body[..]), (b'Q', &b"SELECT 1\0"[..]));
    }

    #[test]
    fn fields_never_read_past_the_end() {
        let body = Bytes::from_static(b"name\0\0\x00\x05");
        let mut fields = Fields::new(&body);
        assert_eq!(fields.cstr("x").expect("name"), "name");
        assert_eq!(fields.cstr("x").expect("empty"), "");
        assert!(fields.i32("x").is_err(), "two bytes are not a 32-bit number");
        let mut value = Fields::new(&Bytes::from_static(b"\x00\x00\x00\x09abc"));
        assert!(value.value("x").is_err(), "a value longer than what is left");
    }

    #[test]
    fn error_fields_round_trip() {
        let encoded = error("42501", "refused", Some("why"));
        let fields = error_fields(&encoded[5..]);
        assert!(fields.contains(&(b'C', "42501".to_owned())));
        assert_eq!(error_body(&fields), encoded[5..].to_vec());
    }
}
