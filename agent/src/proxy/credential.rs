//! Credentials the proxy injects: read from root-only secret files, kept
//! between requests, refreshed when the file changes, and scrubbed from
//! whatever the upstream sends back.

use std::{
    os::unix::fs::MetadataExt,
    path::Path,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Body, Frame};

use hyper::header::{HeaderName, HeaderValue};

use super::{
    body::{BoxError, ProxyBody},
    file_cache::FileCache,
};
use crate::policy::route::Credential;

/// What replaces an echoed credential.
pub const REMOVED: &str = "[credential removed]";

/// Secret header values by file.
pub struct Credentials {
    secrets: FileCache<HeaderValue>,
}

impl Default for Credentials {
    fn default() -> Self {
        Self { secrets: FileCache::new("secret file", load_secret) }
    }
}

impl Credentials {
    /// The header to inject for `credential`.
    pub async fn header(&self, credential: &Credential) -> Result<(HeaderName, HeaderValue), String> {
        let Credential::Header { header, secret_file } = credential else {
            return Err("the route's credential is a database login, not a header".to_owned());
        };
        let name = HeaderName::from_bytes(header.as_bytes()).map_err(|_| format!("'{header}' is not a header name"))?;
        let value = self.secrets.get(&secret_file.0).await?;
        Ok((name, HeaderValue::clone(&value)))
    }

    /// The password of a database login, from its root-only file.
    pub async fn password(&self, password_file: &Path) -> Result<String, String> {
        let value = self.secrets.get(password_file).await?;
        value.to_str().map(str::to_owned).map_err(|_| format!("{} does not hold a password", password_file.display()))
    }
}

/// Reads a secret; the file must belong to root and be private.
fn load_secret(path: &Path, meta: &std::fs::Metadata) -> Result<HeaderValue, String> {
    if meta.uid() != 0 || meta.mode() & 0o077 != 0 {
        return Err(format!("secret file {} must be owned by root and readable by root only", path.display()));
    }
    let secret =
        std::fs::read_to_string(path).map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?;
    let mut value = HeaderValue::from_str(secret.trim_end_matches(['\r', '\n']))
        .map_err(|_| format!("secret file {} does not hold a valid header value", path.display()))?;
    value.set_sensitive(true);
    Ok(value)
}

/// Replaces every occurrence of `needle` that starts before `decided` in
/// `bytes`. Returns the new bytes, how many were found, and where the
/// undecided rest begins.
fn replace_before(bytes: &[u8], needle: &[u8], decided: usize) -> (Vec<u8>, usize, usize) {
    let (mut out, mut found, mut i) = (Vec::with_capacity(bytes.len()), 0, 0);
    while i < decided {
        if bytes[i..].starts_with(needle) {
            out.extend_from_slice(REMOVED.as_bytes());
            found += 1;
            i += needle.len();
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    (out, found, i.min(bytes.len()))
}

/// Replaces every occurrence of `secret` in `body`; returns the new body
/// and how many were found.
pub fn scrub(body: &[u8], secret: &str) -> (Vec<u8>, usize) {
    let (out, found, _) = replace_before(body, secret.as_bytes(), body.len());
    (out, found)
}

/// A streamed answer with every occurrence of the injected credential
/// replaced as it passes, across chunk boundaries: the bytes that could
/// start an occurrence wait for the next chunk.
pub struct Scrubbing {
    inner: ProxyBody,
    needle: Vec<u8>,
    carry: Vec<u8>,
    found: Arc<AtomicUsize>,
    ended: bool,
}

impl Scrubbing {
    /// Scrubs `secret` out of `inner`; `found` counts the replacements.
    pub fn new(inner: ProxyBody, secret: &str, found: Arc<AtomicUsize>) -> Self {
        Self { inner, needle: secret.as_bytes().to_vec(), carry: Vec::new(), found, ended: false }
    }

    /// Replaces what can be decided in `buffer`; keeps the undecided tail.
    fn scrub_chunk(&mut self, chunk: &[u8], last: bool) -> Bytes {
        let mut buffer = std::mem::take(&mut self.carry);
        buffer.extend_from_slice(chunk);
        let keep = if last { 0 } else { self.needle.len().saturating_sub(1) };
        let (out, found, rest) = replace_before(&buffer, &self.needle, buffer.len().saturating_sub(keep));
        self.found.fetch_add(found, Ordering::Relaxed);
        self.carry = buffer[rest..].to_vec();
        Bytes::from(out)
    }
}

impl Body for Scrubbing {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => Poll::Ready(Some(Ok(Frame::data(this.scrub_chunk(&data, false))))),
                // Trailers are not scrubbed: drop them rather than pass them unread.
                Err(_) => Poll::Ready(Some(Ok(Frame::data(Bytes::new())))),
            },
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => {
                this.ended = true;
                let rest = this.scrub_chunk(&[], true);
                if rest.is_empty() { Poll::Ready(None) } else { Poll::Ready(Some(Ok(Frame::data(rest)))) }
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use http_body_util::BodyExt;

    use super::*;

    /// A body that yields the given chunks one frame each.
    struct Chunks(VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.get_mut().0.pop_front().map(|chunk| Ok(Frame::data(chunk))))
        }
    }

    #[tokio::test]
    async fn a_secret_split_across_chunks_is_still_replaced() {
        let chunks: [&'static str; 3] = ["data: Bear", "er tok", "en-1 and Bearer token-1\n"];
        let chunks = chunks.map(|chunk| Bytes::from_static(chunk.as_bytes()));
        let inner = Chunks(chunks.into_iter().collect()).boxed_unsync();
        let found = Arc::new(AtomicUsize::new(0));
        let body = Scrubbing::new(inner, "Bearer token-1", found.clone());
        let out = body.collect().await.expect("collects").to_bytes();
        assert_eq!(&out[..], format!("data: {REMOVED} and {REMOVED}\n").as_bytes());
        assert_eq!(found.load(Ordering::Relaxed), 2);
    }
}
