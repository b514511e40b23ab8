//! The control API: newline-delimited JSON over a unix socket, one request
//! per connection. The caller is known by `SO_PEERCRED`.

pub mod client;
mod errors;
pub mod protocol;
pub mod pull;
pub mod server;
