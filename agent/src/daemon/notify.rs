//! The systemd notification protocol (`Type=notify`): READY once the
//! programs are attached and the socket listens, RELOADING/READY around a
//! reload, STOPPING on the way out. Nothing is sent outside systemd.

use std::os::unix::net::UnixDatagram;

fn send(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let Ok(socket) = UnixDatagram::unbound() else { return };
    let bytes = path.as_encoded_bytes();
    // A leading '@' names an abstract socket.
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
    } else {
        socket.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, state, "cannot notify systemd");
    }
}

/// Started: programs attached, the socket listens.
pub fn ready() {
    send("READY=1\nSTATUS=governing sessions");
}

/// A reload began (READY follows when it is done).
pub fn reloading() {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000 + u64::try_from(t.tv_nsec()).unwrap_or(0) / 1000
    });
    send(&format!("RELOADING=1\nMONOTONIC_USEC={now}\nSTATUS=reloading"));
}

/// Stopping.
pub fn stopping() {
    send("STOPPING=1\nSTATUS=stopping");
}
