//! Network destinations in policy files: a CIDR prefix or a host name, and
//! optionally a port.

use std::{fmt, net::IpAddr, str::FromStr};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, de};

/// A network destination: a CIDR prefix and optionally one port,
/// written `10.0.0.0/8`, `169.254.169.254/32:80`, `::/0`, `[::1]:443` or `1.2.3.4`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Destination {
    /// The prefix.
    pub net: IpNet,
    /// `None` means every port.
    pub port: Option<u16>,
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => write!(f, "{}:{port}", self.net),
            None => write!(f, "{}", self.net),
        }
    }
}

impl FromStr for Destination {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("destination '{text}' is not valid: {why}");
        let parse_port = |p: &str| p.parse::<u16>().map_err(|_| bad("port must be 0..65535"));
        // "[v6]:port" or "[v6]/len:port"
        if let Some(rest) = text.strip_prefix('[') {
            let (addr, after) = rest.split_once(']').ok_or_else(|| bad("missing ']'"))?;
            if !(after.is_empty() || after.starts_with(':') || after.starts_with('/')) {
                return Err(bad("expected ':PORT' or '/PREFIX' after ']'"));
            }
            let (len, port) = match after.strip_prefix('/') {
                Some(tail) => match tail.split_once(':') {
                    Some((len, port)) => (Some(len), Some(port)),
                    None => (Some(tail), None),
                },
                None => (None, after.strip_prefix(':')),
            };
            let addr: IpAddr = addr.parse().map_err(|_| bad("not an IP address"))?;
            let net = make_net(addr, len).map_err(|why| bad(&why))?;
            let port = port.map(parse_port).transpose()?;
            return Ok(Self { net, port });
        }
        if let Some((addr, tail)) = text.split_once('/') {
            let (len, port) = match tail.split_once(':') {
                Some((len, port)) => (len, Some(parse_port(port)?)),
                None => (tail, None),
            };
            let addr: IpAddr = addr.parse().map_err(|_| bad("not an IP address"))?;
            let net = make_net(addr, Some(len)).map_err(|why| bad(&why))?;
            return Ok(Self { net, port });
        }
        if let Ok(addr) = text.parse::<IpAddr>() {
            return Ok(Self { net: IpNet::from(addr), port: None });
        }
        if let Some((addr, port)) = text.rsplit_once(':')
            && let Ok(addr) = addr.parse::<std::net::Ipv4Addr>()
        {
            return Ok(Self { net: IpNet::from(IpAddr::V4(addr)), port: Some(parse_port(port)?) });
        }
        Err(bad("expected ADDRESS[/PREFIX][:PORT]"))
    }
}

fn make_net(addr: IpAddr, len: Option<&str>) -> Result<IpNet, String> {
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(len) => len.parse::<u8>().map_err(|_| format!("prefix length '{len}' is not a number"))?,
        None => max,
    };
    if len > max {
        return Err(format!("prefix length {len} is longer than {max}"));
    }
    let net = IpNet::new(addr, len).map_err(|e| e.to_string())?;
    if net.trunc() != net {
        return Err(format!("host bits are set; did you mean {}?", net.trunc()));
    }
    Ok(net)
}

impl<'de> Deserialize<'de> for Destination {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_parse_in_every_written_form() {
        let d: Destination = "169.254.169.254/32:80".parse().expect("v4 with port");
        assert_eq!((d.net.to_string(), d.port), ("169.254.169.254/32".into(), Some(80)));
        let d: Destination = "::/0".parse().expect("v6 any");
        assert_eq!((d.net.prefix_len(), d.port), (0, None));
        let d: Destination = "[::1]:443".parse().expect("bracketed v6 with port");
        assert_eq!((d.net.to_string(), d.port), ("::1/128".into(), Some(443)));
        let d: Destination = "[fd00::]/8:22".parse().expect("bracketed v6 prefix with port");
        assert_eq!((d.net.prefix_len(), d.port), (8, Some(22)));
        let d: Destination = "10.1.2.3:22".parse().expect("v4 host with port");
        assert_eq!((d.net.prefix_len(), d.port), (32, Some(22)));
    }

    #[test]
    fn bad_destinations_say_why() {
        for (text, why) in [
            ("10.0.0.0/33", "longer than 32"),
            ("10.0.0.1/8", "host bits"),
            ("10.0.0.0/8:99999", "port"),
            ("example.com", "expected ADDRESS"),
            ("[2001:db8::1]443", "after ']'"),
        ] {
            let error = text.parse::<Destination>().expect_err(text);
            assert!(error.contains(why) && error.contains(text), "{text}: {error}");
        }
    }
}

/// A destination by name: `github.com` or `*.githubusercontent.com` (its
/// subdomains), with an optional port. The session's resolver turns the
/// addresses a name resolves to into entries while their answers live.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NameDestination {
    /// The name, lower case, without the root's dot; `*.` for subdomains.
    pub name: String,
    /// `None` means every port.
    pub port: Option<u16>,
}

impl NameDestination {
    /// Does this rule cover a query for `name`?
    pub fn covers(&self, name: &str) -> bool {
        super::route::name_matches(&self.name, name)
    }
}

impl fmt::Display for NameDestination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => write!(f, "{}:{port}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// What `network.allow` and `network.deny` hold: addresses or names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NetTarget {
    /// An address prefix.
    Address(Destination),
    /// A host name.
    Name(NameDestination),
}

impl fmt::Display for NetTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Address(destination) => destination.fmt(f),
            Self::Name(name) => name.fmt(f),
        }
    }
}

impl FromStr for NetTarget {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let address = match text.parse::<Destination>() {
            Ok(destination) => return Ok(Self::Address(destination)),
            Err(why) => why,
        };
        let (name, port) = match text.rsplit_once(':') {
            Some((name, port)) => {
                let port = port.parse::<u16>().map_err(|_| format!("destination '{text}' has a bad port"))?;
                (name, Some(port))
            }
            None => (text, None),
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let bare = name.strip_prefix("*.").unwrap_or(&name);
        // A name has a letter somewhere: `10.0.0.300` is a bad address, not a name.
        if super::route::is_host_name(bare) && bare.chars().any(|c| c.is_ascii_alphabetic()) {
            Ok(Self::Name(NameDestination { name, port }))
        } else {
            Err(format!("{address}, and not a host name either"))
        }
    }
}

impl<'de> Deserialize<'de> for NetTarget {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?.parse().map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod name_tests {
    use super::*;

    #[test]
    fn names_stand_where_addresses_do() {
        let parse = |text: &str| text.parse::<NetTarget>();
        assert!(matches!(parse("10.20.0.0/16"), Ok(NetTarget::Address(_))));
        assert_eq!(
            parse("*.GitHubUserContent.com:443"),
            Ok(NetTarget::Name(NameDestination { name: "*.githubusercontent.com".into(), port: Some(443) }))
        );
        assert!(matches!(parse("metadata.google.internal"), Ok(NetTarget::Name(NameDestination { port: None, .. }))));
        assert!(parse("10.0.0.300").is_err());
        assert!(parse("bad name:80").is_err());
        assert!(parse("github.com:99999").is_err());
        let rule = NameDestination { name: "*.example.com".into(), port: None };
        assert!(rule.covers("a.example.com") && !rule.covers("example.com") && !rule.covers("evilexample.com"));
    }
}
