//! Decoding ring buffer records into typed events.

use std::net::{IpAddr, Ipv6Addr};

use tollgate_common::{
    ARGV_LEN, ConnectEvent, EXEC_ARGV_TRUNCATED, EXEC_ARGV_UNREADABLE, EXEC_FILENAME_TRUNCATED, EventHeader, EventKind,
    ExecEvent, ExitEvent, FILENAME_LEN, ForkEvent, NO_RULE, SocketEvent, Verdict,
};

use crate::policy::compile::FileId;

/// An event from the kernel, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelEvent {
    /// An exec, allowed or refused.
    Exec {
        /// Where and when.
        at: Origin,
        /// Parent at exec time, as the kernel sees it.
        ppid: u32,
        /// Real uid.
        uid: u32,
        /// Allow, Deny (LSM) or Killed (tracepoint).
        verdict: Verdict,
        /// The file name given to exec.
        filename: String,
        /// Set when the file name was cut.
        filename_truncated: bool,
        /// The arguments.
        argv: Vec<String>,
        /// Set when the arguments were cut or unreadable.
        argv_truncated: bool,
        /// The file executed, as the kernel identifies it.
        file: FileId,
    },
    /// A new process.
    Fork {
        /// Where and when (`pid` is the parent).
        at: Origin,
        /// The new process.
        child_pid: u32,
    },
    /// A process ended.
    Exit {
        /// Where and when.
        at: Origin,
        /// The exit status (0..255) when it exited normally.
        code: Option<u8>,
        /// The signal that ended it, if one did.
        signal: Option<u8>,
    },
    /// A connect or unconnected send.
    Connect {
        /// Where and when.
        at: Origin,
        /// Allow or Deny.
        verdict: Verdict,
        /// Destination; IPv4-mapped IPv6 is shown as IPv4.
        addr: IpAddr,
        /// Destination port.
        port: u16,
        /// 4 or 6: the socket's family.
        family: u8,
        /// "tcp", "udp" or a number.
        protocol: String,
        /// True for `sendmsg` without connect.
        send: bool,
        /// Index of the session's rule that decided, if one did.
        rule_id: Option<u32>,
    },
    /// A socket kind sessions may not create was refused.
    Socket {
        /// Where and when.
        at: Origin,
        /// `AF_*`.
        family: u32,
        /// `SOCK_*`.
        sock_type: u32,
        /// `IPPROTO_*`.
        protocol: u32,
    },
}

/// What every event has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The session's cgroup.
    pub cgroup_id: u64,
    /// The process.
    pub pid: u32,
    /// `CLOCK_BOOTTIME` nanoseconds.
    pub boot_ns: u64,
}

impl KernelEvent {
    /// Where and when it happened.
    pub fn origin(&self) -> Origin {
        match self {
            Self::Exec { at, .. }
            | Self::Fork { at, .. }
            | Self::Exit { at, .. }
            | Self::Connect { at, .. }
            | Self::Socket { at, .. } => *at,
        }
    }
}

/// Why a record could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than its kind needs.
    #[error("event of kind {kind} is {len} bytes, expected {expected}")]
    Short {
        /// Kind number.
        kind: u32,
        /// Bytes received.
        len: usize,
        /// Bytes needed.
        expected: usize,
    },
    /// An exec event whose names do not fit it, or are longer than the kernel side sends.
    #[error("exec event of {len} bytes claims a {filename_len}-byte file name and {argv_len} bytes of arguments")]
    ExecNames {
        /// Bytes received.
        len: usize,
        /// Bytes of file name claimed.
        filename_len: usize,
        /// Bytes of arguments claimed.
        argv_len: usize,
    },
    /// A kind this agent does not know (object and agent out of step).
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    /// A verdict this agent does not know.
    #[error("unknown verdict {0}")]
    UnknownVerdict(u32),
}

fn read<T: aya::Pod>(bytes: &[u8], kind: u32) -> Result<T, DecodeError> {
    tollgate_common::read(bytes).ok_or(DecodeError::Short { kind, len: bytes.len(), expected: size_of::<T>() })
}

/// Decodes one ring buffer record.
pub fn decode(bytes: &[u8]) -> Result<KernelEvent, DecodeError> {
    let header: EventHeader = read(bytes, 0)?;
    let at = Origin { cgroup_id: header.cgroup_id, pid: header.pid, boot_ns: header.boot_ns };
    let verdict = |raw: u32| Verdict::try_from(raw).map_err(DecodeError::UnknownVerdict);
    match EventKind::try_from(header.kind).map_err(DecodeError::UnknownKind)? {
        EventKind::Exec => {
            let event: ExecEvent = read(bytes, header.kind)?;
            let (filename, argv) = exec_strings(bytes, &event)?;
            let argv = argv.split(|&b| b == 0).map(|arg| String::from_utf8_lossy(arg).into_owned()).collect::<Vec<_>>();
            // The argument area ends with a NUL, which leaves one empty piece.
            let argv = match argv.split_last() {
                Some((last, rest)) if last.is_empty() => rest.to_vec(),
                _ => argv,
            };
            Ok(KernelEvent::Exec {
                at,
                ppid: event.ppid,
                uid: event.uid,
                verdict: verdict(event.verdict)?,
                filename: String::from_utf8_lossy(filename).into_owned(),
                filename_truncated: event.flags & EXEC_FILENAME_TRUNCATED != 0,
                argv,
                argv_truncated: event.flags & (EXEC_ARGV_TRUNCATED | EXEC_ARGV_UNREADABLE) != 0,
                file: FileId { dev: event.dev, ino: event.ino },
            })
        }
        EventKind::Fork => {
            let event: ForkEvent = read(bytes, header.kind)?;
            Ok(KernelEvent::Fork { at, child_pid: event.child_pid })
        }
        EventKind::Exit => {
            let event: ExitEvent = read(bytes, header.kind)?;
            let signal = (event.exit_code & 0x7f) as u8;
            let (code, signal) =
                if signal == 0 { (Some(((event.exit_code >> 8) & 0xff) as u8), None) } else { (None, Some(signal)) };
            Ok(KernelEvent::Exit { at, code, signal })
        }
        EventKind::Connect => {
            let event: ConnectEvent = read(bytes, header.kind)?;
            let v6 = Ipv6Addr::from(event.addr);
            let addr = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
            let protocol = match event.protocol {
                6 => "tcp".to_owned(),
                17 => "udp".to_owned(),
                other => other.to_string(),
            };
            Ok(KernelEvent::Connect {
                at,
                verdict: verdict(event.verdict)?,
                addr,
                port: event.port as u16,
                family: event.family as u8,
                protocol,
                send: event.send != 0,
                rule_id: (event.rule_id != NO_RULE).then_some(event.rule_id),
            })
        }
        EventKind::Socket => {
            let event: SocketEvent = read(bytes, header.kind)?;
            Ok(KernelEvent::Socket { at, family: event.family, sock_type: event.sock_type, protocol: event.protocol })
        }
    }
}

/// The file name and the argument bytes that follow an exec event's fixed
/// part. A record may be longer than its names: the LSM hook's refusals
/// carry room for the longest file name.
fn exec_strings<'a>(bytes: &'a [u8], event: &ExecEvent) -> Result<(&'a [u8], &'a [u8]), DecodeError> {
    let filename_len = event.filename_len as usize;
    let argv_len = event.argv_len as usize;
    let expected = size_of::<ExecEvent>() + filename_len + argv_len;
    if filename_len >= FILENAME_LEN || argv_len > ARGV_LEN || bytes.len() < expected {
        return Err(DecodeError::ExecNames { len: bytes.len(), filename_len, argv_len });
    }
    let strings = &bytes[size_of::<ExecEvent>()..expected];
    Ok(strings.split_at(filename_len))
}

/// The name of an event kind slot in the lost-event counters.
pub fn kind_name(slot: usize) -> &'static str {
    u32::try_from(slot).ok().and_then(|slot| EventKind::try_from(slot).ok()).map_or("unknown", EventKind::name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of<T>(value: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a repr(C) value for the test.
        unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    /// An exec event's fixed part followed by its file name and arguments, as the kernel side sends it.
    fn exec_bytes(filename: &[u8], args: &[u8]) -> Vec<u8> {
        let event = ExecEvent {
            header: EventHeader { kind: 1, pid: 42, cgroup_id: 7, boot_ns: 1 },
            ppid: 41,
            uid: 1000,
            verdict: Verdict::Killed as u32,
            flags: EXEC_ARGV_TRUNCATED,
            dev: 0,
            argv_len: args.len() as u32,
            ino: 0,
            filename_len: filename.len() as u32,
            reserved: 0,
        };
        [bytes_of(&event).as_slice(), filename, args].concat()
    }

    #[test]
    fn exec_events_decode_arguments_and_flags() {
        let bytes = exec_bytes(b"/bin/ls", b"ls\0-la\0/tmp\0");
        let decoded = decode(&bytes).expect("decodes");
        let KernelEvent::Exec { filename, argv, argv_truncated, verdict, ppid, .. } = decoded else {
            panic!("not an exec: {decoded:?}");
        };
        assert_eq!(filename, "/bin/ls");
        assert_eq!(argv, vec!["ls", "-la", "/tmp"]);
        assert!(argv_truncated);
        assert_eq!((verdict, ppid), (Verdict::Killed, 41));
    }

    /// Only the names used are sent: a short exec is a short record, and one
    /// claiming more names than it carries (or than the kernel side sends)
    /// is refused rather than read past.
    #[test]
    fn exec_events_carry_only_their_names_and_are_checked_against_them() {
        let bytes = exec_bytes(b"/bin/true", b"true\0");
        assert_eq!(bytes.len(), size_of::<ExecEvent>() + 9 + 5);
        assert!(matches!(decode(&bytes), Ok(KernelEvent::Exec { ref filename, .. }) if filename == "/bin/true"));

        let cut = &bytes[..bytes.len() - 1];
        let error = decode(cut).expect_err("a record shorter than its names");
        assert_eq!(error.to_string(), "exec event of 77 bytes claims a 9-byte file name and 5 bytes of arguments");

        // A refusal from the LSM hook: room for the longest name after the one it has.
        let refused = [exec_bytes(b"/usr/bin/nc", b"").as_slice(), &[0; FILENAME_LEN - 11]].concat();
        assert!(matches!(decode(&refused), Ok(KernelEvent::Exec { ref filename, ref argv, .. })
            if filename == "/usr/bin/nc" && argv.is_empty()));

        let long_name = vec![b'a'; FILENAME_LEN];
        assert!(matches!(decode(&exec_bytes(&long_name, b"")), Err(DecodeError::ExecNames { filename_len: 256, .. })));
        let long_args = vec![b'a'; ARGV_LEN + 1];
        assert!(matches!(decode(&exec_bytes(b"/x", &long_args)), Err(DecodeError::ExecNames { argv_len: 513, .. })));
    }

    #[test]
    fn exit_status_splits_code_and_signal() {
        let exit = |raw| ExitEvent {
            header: EventHeader { kind: 3, pid: 1, cgroup_id: 1, boot_ns: 0 },
            exit_code: raw,
            reserved: 0,
        };
        assert!(matches!(decode(&bytes_of(&exit(3 << 8))), Ok(KernelEvent::Exit { code: Some(3), signal: None, .. })));
        assert!(matches!(decode(&bytes_of(&exit(9))), Ok(KernelEvent::Exit { code: None, signal: Some(9), .. })));
    }

    #[test]
    fn short_and_unknown_records_are_errors() {
        assert!(matches!(decode(&[0u8; 4]), Err(DecodeError::Short { .. })));
        let header = EventHeader { kind: 99, pid: 1, cgroup_id: 1, boot_ns: 0 };
        assert_eq!(decode(&bytes_of(&header)), Err(DecodeError::UnknownKind(99)));
    }
}
