//! SSRF guard for webhook targets: loopback, private, link-local, metadata, multicast,
//! reserved and IPv4-embedding IPv6 forms are refused unless allow-listed. The check
//! runs on the addresses the HTTP client actually connects to (a DNS resolver hook),
//! so a name that resolves differently at delivery time cannot slip through.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

/// Why an address is not a public unicast address, or `None` if it is.
pub fn blocked_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_reason(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = embedded_v4(v6) {
                return v4_reason(v4).map(|_| "an IPv6 form of a non-public IPv4 address");
            }
            let s = v6.segments();
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if s[0] & 0xfe00 == 0xfc00 {
                Some("private (unique local, including cloud metadata fd00:ec2::254)")
            } else if s[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if s[0] & 0xffc0 == 0xfec0 {
                Some("site-local (deprecated private fec0::/10)")
            } else if s[0] & 0xff00 == 0xff00 {
                Some("multicast")
            } else if (s[0] == 0x2001 && s[1] == 0x0db8) || (s[0] == 0x3fff && s[1] < 0x1000) {
                Some("documentation")
            } else if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
                Some("local-use IPv4/IPv6 translation (64:ff9b:1::/48)")
            } else if s[0] == 0x2001 && s[1] < 0x0200 && !ietf_global(v6) {
                Some("IETF protocol assignments (2001::/23: Teredo, benchmarking, ORCHID)")
            } else if s[0] & 0xe000 != 0x2000 {
                Some("not global unicast (outside 2000::/3: reserved, discard-only 100::/64, SRv6 5f00::/16)")
            } else {
                None
            }
        }
    }
}

/// The globally reachable exceptions inside 2001::/23 (IANA special-purpose registry).
fn ietf_global(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    let anycast = s[1] == 1 && s[2..7] == [0, 0, 0, 0, 0] && (1..=3).contains(&s[7]); // PCP, TURN, DNS-SD SRP
    anycast
        || s[1] == 3 // AMT 2001:3::/32
        || (s[1] == 4 && s[2] == 0x112) // AS112-v6 2001:4:112::/48
        || (0x20..0x40).contains(&s[1]) // ORCHIDv2 2001:20::/28, drone remote ID 2001:30::/28
}

fn v4_reason(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip == Ipv4Addr::new(169, 254, 169, 254) {
        Some("cloud metadata")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if o[0] == 0 {
        Some("unspecified (0.0.0.0/8)")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("shared address space (100.64.0.0/10)")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("IETF protocol assignments (192.0.0.0/24)")
    } else if o[0] == 192 && o[1] == 88 && o[2] == 99 {
        Some("deprecated 6to4 relay anycast (192.88.99.0/24)")
    } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
        Some("benchmarking (198.18.0.0/15)")
    } else if ip.is_multicast() || ip.is_broadcast() || o[0] >= 240 {
        Some("multicast or reserved")
    } else if ip.is_documentation() {
        Some("documentation")
    } else {
        None
    }
}

/// The IPv4 address inside IPv4-mapped, IPv4-translated, IPv4-compatible, NAT64 and
/// 6to4 forms.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if let Some(v4) = ip.to_ipv4_mapped() {
        Some(v4)
    } else if (s[..6] == [0, 0, 0, 0, 0, 0] && !ip.is_loopback() && !ip.is_unspecified())
        || (s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0])
        || s[..6] == [0, 0, 0, 0, 0xffff, 0]
    {
        // IPv4-compatible ::a.b.c.d, NAT64 64:ff9b::/96, IPv4-translated ::ffff:0:a.b.c.d
        Some(tail)
    } else if s[0] == 0x2002 {
        Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        )) // 6to4
    } else {
        None
    }
}

/// The allow-list: `--webhook-allow CIDR|IP|HOST` (repeatable).
#[derive(Debug, Clone, Default)]
pub struct Policy {
    nets: Vec<IpNet>,
    hosts: Vec<String>,
}

impl Policy {
    /// `allow_loopback` is the `run` mode default (local development).
    pub fn new(allow: &[String], allow_loopback: bool) -> Result<Policy, String> {
        let mut p = Policy::default();
        if allow_loopback {
            p.nets.push("127.0.0.0/8".parse().expect("cidr"));
            p.nets.push("::1/128".parse().expect("cidr"));
            p.hosts.push("localhost".into());
        }
        for item in allow.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
            if let Ok(net) = item.parse::<IpNet>() {
                p.nets.push(net);
            } else if let Ok(ip) = item.parse::<IpAddr>() {
                p.nets.push(IpNet::from(ip));
            } else if item
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            {
                p.hosts.push(item.to_ascii_lowercase());
            } else {
                return Err(format!(
                    "--webhook-allow {item:?} is neither a CIDR, an IP address nor a host name"
                ));
            }
        }
        Ok(p)
    }

    fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts.contains(&host)
    }

    /// `Err(reason)` when connecting to `ip` is refused.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), String> {
        let canonical = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        if self
            .nets
            .iter()
            .any(|n| n.contains(&ip) || n.contains(&canonical))
        {
            return Ok(());
        }
        match blocked_reason(ip) {
            None => Ok(()),
            Some(why) => Err(format!("{ip} is {why}; allow it with --webhook-allow")),
        }
    }

    /// What can be decided about a webhook URL without DNS: its scheme, credentials and
    /// (for an IP literal, however it is spelled) its address.
    pub fn precheck_url(&self, raw: &str) -> Result<Precheck, String> {
        let url = reqwest::Url::parse(raw)
            .map_err(|e| format!("fal_webhook is not a valid URL ({e})"))?;
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(format!(
                "fal_webhook must be http or https, not {}",
                url.scheme()
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("fal_webhook must not carry credentials in the URL".into());
        }
        let port = url.port_or_known_default().unwrap_or(80);
        let ip = match url.host() {
            None => return Err("fal_webhook has no host".into()),
            Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
            Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
            Some(url::Host::Domain(name)) => {
                if self.host_allowed(name) {
                    return Ok(Precheck::Accepted(url));
                }
                let host = name.to_string();
                return Ok(Precheck::Resolve { url, host, port });
            }
        };
        self.check_ip(ip)?;
        Ok(Precheck::Accepted(url))
    }

    /// Checks a webhook URL at submit time: scheme, host, and every address it resolves to.
    pub async fn check_url(&self, raw: &str) -> Result<reqwest::Url, String> {
        let (url, name, port) = match self.precheck_url(raw)? {
            Precheck::Accepted(url) => return Ok(url),
            Precheck::Resolve { url, host, port } => (url, host, port),
        };
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), port))
            .await
            .map_err(|e| format!("fal_webhook host {name} does not resolve ({e})"))?
            .collect();
        let refused: Vec<String> = addrs
            .iter()
            .filter_map(|a| self.check_ip(a.ip()).err())
            .collect();
        if addrs.is_empty() || refused.len() == addrs.len() {
            return Err(format!(
                "fal_webhook host {name} resolves only to refused addresses: {}",
                refused.join("; ")
            ));
        }
        Ok(url)
    }
}

/// The outcome of [`Policy::precheck_url`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precheck {
    /// An allowed IP literal or allow-listed host name.
    Accepted(reqwest::Url),
    /// A host name: its addresses decide (at submit, and again at every delivery).
    Resolve {
        url: reqwest::Url,
        host: String,
        port: u16,
    },
}

/// DNS resolver for the webhook client that drops refused addresses, so the address
/// checked is the address connected to.
pub struct GuardedResolver(pub Arc<Policy>);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if policy.host_allowed(&host) {
                return Ok(Box::new(all.into_iter()) as reqwest::dns::Addrs);
            }
            let ok: Vec<SocketAddr> = all
                .iter()
                .copied()
                .filter(|a| policy.check_ip(a.ip()).is_ok())
                .collect();
            if ok.is_empty() {
                let e: Box<dyn std::error::Error + Send + Sync> =
                    format!("webhook host {host} resolves only to refused addresses").into();
                return Err(e);
            }
            Ok(Box::new(ok.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(p: &Policy, ip: &str) -> bool {
        p.check_ip(ip.parse().unwrap()).is_err()
    }

    #[test]
    fn refuses_non_public_addresses() {
        let p = Policy::new(&[], false).unwrap();
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "169.254.1.1",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fc00::1",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "2002:a00:1::",
            "::10.0.0.1",
            // Regression: IPv4-translated (::ffff:0:0/96), local-use NAT64, site-local,
            // Teredo, discard-only, SRv6, new documentation prefix, 6to4 relay anycast
            // passed as public.
            "::ffff:0:7f00:1",
            "::ffff:0:a9fe:a9fe",
            "64:ff9b:1::a00:1",
            "fec0::1",
            "2001::1",
            "2001:2::1",
            "100::1",
            "5f00::1",
            "3fff::1",
            "192.88.99.1",
        ] {
            assert!(refused(&p, ip), "{ip} must be refused");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "2001:4:112::1",
            "2001:1::1",
        ] {
            assert!(!refused(&p, ip), "{ip} is public");
        }
    }

    #[test]
    fn allow_list_and_run_mode_loopback() {
        let p = Policy::new(
            &[
                "10.0.0.0/8".into(),
                "hooks.internal".into(),
                "192.168.1.5".into(),
            ],
            false,
        )
        .unwrap();
        assert!(!refused(&p, "10.9.9.9"));
        assert!(!refused(&p, "::ffff:10.9.9.9"));
        assert!(!refused(&p, "192.168.1.5"));
        assert!(refused(&p, "192.168.1.6"));
        assert!(refused(&p, "127.0.0.1"));
        assert!(p.host_allowed("HOOKS.internal."));
        let run = Policy::new(&[], true).unwrap();
        assert!(!refused(&run, "127.0.0.1"));
        assert!(!refused(&run, "::1"));
        assert!(refused(&run, "10.0.0.1"));
        assert!(Policy::new(&["not a host!".into()], false).is_err());
    }

    #[tokio::test]
    async fn urls_are_checked_at_submit() {
        let p = Policy::new(&[], false).unwrap();
        assert!(p
            .check_url("http://169.254.169.254/latest")
            .await
            .unwrap_err()
            .contains("metadata"));
        assert!(p.check_url("http://[::ffff:10.0.0.1]/").await.is_err());
        assert!(p
            .check_url("http://localhost:9/")
            .await
            .unwrap_err()
            .contains("refused"));
        assert!(p.check_url("ftp://example.com/").await.is_err());
        assert!(p.check_url("http://user:pw@8.8.8.8/").await.is_err());
        assert!(p.check_url("not a url").await.is_err());
        assert!(p.check_url("https://8.8.8.8/hook").await.is_ok());
        let run = Policy::new(&[], true).unwrap();
        assert!(run.check_url("http://127.0.0.1:9/hook").await.is_ok());
        assert!(run.check_url("http://localhost:9/hook").await.is_ok());
    }
}
