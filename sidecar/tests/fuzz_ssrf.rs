//! Property tests (bounded fuzzing) of the webhook URL guard (`webhook::ssrf`):
//! `blocked_reason` against an independent table of the IANA special-purpose registries
//! (and std's own classification), and `precheck_url` on every spelling of a refused
//! address a URL parser accepts (decimal, octal, hex, short IPv4 forms, trailing dots,
//! percent-encoding, full-width digits, IPv4-mapped/translated/compatible IPv6, ports).
//! Cases per property: 1024, or `PROPTEST_CASES`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use fal_sidecar::webhook::ssrf::{blocked_reason, Policy, Precheck};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proptest::prelude::*;
use proptest::test_runner::Config;

/// 1024 cases per property (well under a second), or `PROPTEST_CASES` (scripts/fuzz.sh
/// runs many more); failures are turned into fixed-input tests by hand, so none are
/// persisted.
fn config() -> Config {
    let mut c = Config {
        failure_persistence: None,
        ..Config::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = 1024;
    }
    c
}

/// Not globally reachable IPv4 (IANA IPv4 special-purpose registry), plus multicast and
/// all of 192.0.0.0/24 and 192.88.99.0/24 (refused whole on purpose).
const V4_REFUSED: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// Not globally reachable IPv6 inside 2000::/3 (everything outside it is refused too,
/// apart from the IPv4-embedding forms, which are judged by their IPv4 address).
const V6_REFUSED_IN_GLOBAL: &[&str] = &["2001::/23", "2001:db8::/32", "3fff::/20"];
/// Globally reachable exceptions inside 2001::/23.
const V6_GLOBAL_EXCEPTIONS: &[&str] = &[
    "2001:1::1/128",
    "2001:1::2/128",
    "2001:1::3/128",
    "2001:3::/32",
    "2001:4:112::/48",
    "2001:20::/28",
    "2001:30::/28",
];

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn in_any(list: &[&str], ip: IpAddr) -> bool {
    nets(list).iter().any(|n| n.contains(&ip))
}

fn v4_refused(ip: Ipv4Addr) -> bool {
    in_any(V4_REFUSED, IpAddr::V4(ip))
}

/// The reference: is this address refused?
fn refused(ip: IpAddr) -> bool {
    let v6 = match ip {
        IpAddr::V4(v4) => return v4_refused(v4),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    let within = |net: &str| net.parse::<Ipv6Net>().unwrap().contains(&v6);
    // IPv4-embedding forms: mapped, translated, compatible, NAT64 (well-known), 6to4.
    if within("::ffff:0:0/96") || within("::ffff:0:0:0/96") || within("64:ff9b::/96") {
        return v4_refused(tail);
    }
    if within("::/96") && v6 != Ipv6Addr::UNSPECIFIED && v6 != Ipv6Addr::LOCALHOST {
        return v4_refused(tail);
    }
    if within("2002::/16") {
        return v4_refused(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    if !within("2000::/3") {
        return true;
    }
    in_any(V6_REFUSED_IN_GLOBAL, ip) && !in_any(V6_GLOBAL_EXCEPTIONS, ip)
}

/// Addresses biased towards the edges of the interesting ranges.
fn address() -> impl Strategy<Value = IpAddr> {
    let v4_nets: Vec<Ipv4Net> = V4_REFUSED
        .iter()
        .chain(&[
            "8.0.0.0/8",
            "100.0.0.0/8",
            "192.0.0.0/8",
            "198.0.0.0/8",
            "169.254.169.0/24",
        ])
        .map(|s| s.parse().unwrap())
        .collect();
    let v6_nets: Vec<Ipv6Net> = [
        "::/96",
        "::ffff:0:0/96",
        "::ffff:0:0:0/96",
        "64:ff9b::/96",
        "64:ff9b:1::/48",
        "100::/64",
        "2001::/23",
        "2001::/32",
        "2001:1::/120",
        "2001:db8::/32",
        "2002::/16",
        "3fff::/20",
        "3ff0::/12",
        "5f00::/16",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
        "2000::/3",
        "2606:4700::/32",
        "::/8",
        "::/0",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    prop_oneof![
        any::<u32>().prop_map(|n| IpAddr::V4(n.into())),
        any::<u128>().prop_map(|n| IpAddr::V6(n.into())),
        (proptest::sample::select(v4_nets), any::<u32>()).prop_map(|(net, r)| {
            let host = r & !u32::from(net.netmask());
            IpAddr::V4((u32::from(net.network()) | host).into())
        }),
        (proptest::sample::select(v6_nets), any::<u128>(), 0..3u8).prop_map(|(net, r, small)| {
            let mut host = r & !u128::from(net.netmask());
            if small == 0 {
                host &= 0xffff_ffff; // an IPv4-sized tail
            }
            IpAddr::V6((u128::from(net.network()) | host).into())
        }),
    ]
}

/// A refused IPv4 address: a refused network and random host bits.
fn refused_v4() -> impl Strategy<Value = Ipv4Addr> {
    let refused: Vec<Ipv4Net> = V4_REFUSED.iter().map(|s| s.parse().unwrap()).collect();
    (proptest::sample::select(refused), any::<u32>())
        .prop_map(|(net, r)| (u32::from(net.network()) | (r & !u32::from(net.netmask()))).into())
}

/// One IPv4 number part as WHATWG and inet_aton read it: decimal, octal (leading 0)
/// or hex (0x/0X).
fn part(n: u32, style: u8) -> String {
    match style % 4 {
        0 => n.to_string(),
        1 => format!("0{n:o}"),
        2 => format!("0x{n:x}"),
        _ => format!("0X{n:X}"),
    }
}

/// A URL host that spells `ip` some way a parser may accept.
fn spell_v4(
    ip: Ipv4Addr,
    form: u8,
    styles: &[u8; 4],
    trailing_dot: bool,
    wide: bool,
    pct: bool,
) -> String {
    let o = ip.octets();
    let n = u32::from(ip);
    let mut host = match form % 4 {
        0 => (0..4)
            .map(|i| part(o[i] as u32, styles[i]))
            .collect::<Vec<_>>()
            .join("."),
        1 => format!(
            "{}.{}.{}",
            part(o[0] as u32, styles[0]),
            part(o[1] as u32, styles[1]),
            part(n & 0xffff, styles[2])
        ),
        2 => format!(
            "{}.{}",
            part(o[0] as u32, styles[0]),
            part(n & 0xff_ffff, styles[1])
        ),
        _ => part(n, styles[0]),
    };
    if trailing_dot {
        host.push('.');
    }
    if wide {
        // Full-width digits and dots: IDNA maps them to ASCII.
        host = host
            .chars()
            .map(|c| match c {
                '0'..='9' => char::from_u32(c as u32 - '0' as u32 + 0xff10).unwrap(),
                '.' => '\u{ff0e}',
                c => c,
            })
            .collect();
    } else if pct {
        host = host.bytes().map(|b| format!("%{b:02X}")).collect();
    }
    host
}

fn spell_v6(ip: Ipv6Addr, style: u8) -> String {
    let s = ip.segments();
    match style % 4 {
        0 => ip.to_string(),
        1 => s
            .iter()
            .map(|g| format!("{g:04x}"))
            .collect::<Vec<_>>()
            .join(":"),
        2 => ip.to_string().to_ascii_uppercase(),
        _ => {
            let o = ip.octets();
            let head = s[..6]
                .iter()
                .map(|g| format!("{g:x}"))
                .collect::<Vec<_>>()
                .join(":");
            format!("{head}:{}.{}.{}.{}", o[12], o[13], o[14], o[15])
        }
    }
}

fn url_around(host: &str, port: Option<u16>, https: bool) -> String {
    let scheme = if https { "https" } else { "http" };
    match port {
        Some(p) => format!("{scheme}://{host}:{p}/hook?x=1"),
        None => format!("{scheme}://{host}/hook"),
    }
}

proptest! {
    #![proptest_config(config())]

    /// The guard and the reference agree on every address: nothing refused slips
    /// through, nothing public is refused.
    #[test]
    fn guard_matches_the_registries(ip in address()) {
        prop_assert_eq!(blocked_reason(ip).is_some(), refused(ip), "{}", ip);
    }

    /// Cross-check with std's own classification (independent of both tables).
    #[test]
    fn std_non_global_is_refused(ip in address()) {
        let non_global = match ip {
            IpAddr::V4(v4) => v4.is_private() || v4.is_loopback() || v4.is_link_local()
                || v4.is_broadcast() || v4.is_documentation() || v4.is_multicast() || v4.is_unspecified(),
            IpAddr::V6(v6) => v6.is_loopback() || v6.is_unspecified() || v6.is_multicast()
                || v6.is_unique_local() || v6.is_unicast_link_local()
                || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_private() || v4.is_loopback() || v4.is_link_local()),
        };
        if non_global {
            prop_assert!(blocked_reason(ip).is_some(), "{}", ip);
        }
    }

    /// However a refused IPv4 address is spelled in a webhook URL, it is refused
    /// before any DNS lookup, or (if the URL parser reads it as a name) left to the
    /// resolver hook, which checks the addresses it resolves to: never accepted as is.
    #[test]
    fn refused_v4_in_any_spelling(
        ip in refused_v4(), form in 0..4u8, styles in any::<[u8; 4]>(), dot in any::<bool>(),
        wide in any::<bool>(), pct in any::<bool>(), port in proptest::option::of(any::<u16>()),
        https in any::<bool>(), v6 in 0..4u8,
    ) {
        let p = Policy::new(&[], false).unwrap();
        let host = spell_v4(ip, form, &styles, dot, wide, pct);
        let url = url_around(&host, port, https);
        prop_assert!(!matches!(p.precheck_url(&url), Ok(Precheck::Accepted(_))), "{url}");
        if let Ok(Precheck::Resolve { host, .. }) = p.precheck_url(&url) {
            prop_assert!(host.parse::<IpAddr>().is_err(), "{url} -> {host}");
        }
        // The IPv4-embedding IPv6 forms of the same address.
        let o = ip.octets();
        let tail = u128::from(u32::from(ip));
        let mapped = match v6 {
            0 => Ipv6Addr::from(0xffff_0000_0000u128 | tail),
            1 => Ipv6Addr::from(0xffff_0000_0000_0000u128 | tail),
            2 => Ipv6Addr::from((0x64_ff9b_u128 << 96) | tail),
            _ => Ipv6Addr::from((0x2002u128 << 112) | (u128::from(u32::from_be_bytes(o)) << 80)),
        };
        for style in 0..4 {
            let url = url_around(&format!("[{}]", spell_v6(mapped, style)), port, https);
            prop_assert!(p.precheck_url(&url).is_err(), "{url}");
        }
    }

    #[test]
    fn refused_v6_in_any_spelling(ip in address(), style in 0..4u8, port in proptest::option::of(any::<u16>())) {
        let IpAddr::V6(v6) = ip else { return Ok(()) };
        let p = Policy::new(&[], false).unwrap();
        let url = url_around(&format!("[{}]", spell_v6(v6, style)), port, false);
        prop_assert_eq!(p.precheck_url(&url).is_err(), refused(ip), "{}", url);
    }

    /// Public addresses are accepted (no over-blocking), in their usual spellings.
    #[test]
    fn public_addresses_are_accepted(
        ip in address(),
        port in proptest::option::of(1..u16::MAX),
    ) {
        if refused(ip) {
            return Ok(()); // (about half the cases; filtering would abort long runs)
        }
        let p = Policy::new(&[], false).unwrap();
        let host = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        let url = url_around(&host, port, true);
        prop_assert!(matches!(p.precheck_url(&url), Ok(Precheck::Accepted(_))), "{}", url);
    }

    /// Credentials in the URL are refused whatever the host.
    #[test]
    fn userinfo_is_refused(user in "[a-z0-9.]{1,8}", pass in proptest::option::of("[a-z0-9]{0,8}"), ip in address()) {
        let p = Policy::new(&[], false).unwrap();
        let host = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        let auth = match &pass {
            Some(pw) => format!("{user}:{pw}"),
            None => user.clone(),
        };
        let url = format!("http://{auth}@{host}/");
        prop_assert!(p.precheck_url(&url).is_err(), "{}", url);
    }

    /// An allow-listed network admits its addresses, IPv4-mapped forms included, and
    /// nothing else that is refused.
    #[test]
    fn allow_list_admits_exactly_its_nets(ip in address(), other in address()) {
        let IpAddr::V4(v4) = ip else { return Ok(()) };
        let net = Ipv4Net::new(v4, 24).unwrap().trunc();
        let p = Policy::new(&[net.to_string()], false).unwrap();
        prop_assert!(p.check_ip(ip).is_ok());
        prop_assert!(p.check_ip(IpAddr::V6(v4.to_ipv6_mapped())).is_ok());
        let other_v4 = match other {
            IpAddr::V4(o) => Some(o),
            IpAddr::V6(o) => o.to_ipv4_mapped(),
        };
        if refused(other) && !other_v4.is_some_and(|o| net.contains(&o)) {
            prop_assert!(p.check_ip(other).is_err(), "{}", other);
        }
    }

    /// Any string: an answer, never a panic; what is accepted as is, is an allowed
    /// IP literal.
    #[test]
    fn precheck_any_string(raw in prop_oneof!["[ -~]{0,40}", "https?://[ -~]{0,40}"]) {
        let p = Policy::new(&[], false).unwrap();
        if let Ok(Precheck::Accepted(url)) = p.precheck_url(&raw) {
            let ip = match url.host() {
                Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
                Some(url::Host::Ipv6(v6)) => IpAddr::V6(v6),
                other => panic!("{raw}: accepted without a check: {other:?}"),
            };
            prop_assert!(!refused(ip), "{raw}");
        }
    }
}

/// Regression: IPv4-translated addresses (`::ffff:0:a.b.c.d`, SIIT) were not recognised
/// as IPv4 forms and passed as public IPv6, as did local-use NAT64, site-local, Teredo,
/// benchmarking, discard-only, SRv6 and the new documentation prefix.
#[test]
fn ipv6_special_ranges_are_refused() {
    let p = Policy::new(&[], false).unwrap();
    for url in [
        "http://[::ffff:0:127.0.0.1]/",
        "http://[::ffff:0:a9fe:a9fe]/",
        "http://[64:ff9b:1::a00:1]/",
        "http://[fec0::1]/",
        "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",
        "http://[2001:2::1]/",
        "http://[100::1]/",
        "http://[5f00::1]/",
        "http://[3fff:0:1::1]/",
        "http://192.88.99.1/",
    ] {
        assert!(p.precheck_url(url).is_err(), "{url}");
    }
    for url in [
        "http://[2001:4:112::1]/",
        "http://[2001:1::1]/",
        "http://[2606:4700::1111]/",
    ] {
        assert!(
            matches!(p.precheck_url(url), Ok(Precheck::Accepted(_))),
            "{url}"
        );
    }
}

/// Spellings of 169.254.169.254 (cloud metadata) that URL parsers normalise.
#[test]
fn metadata_address_spellings() {
    let p = Policy::new(&[], false).unwrap();
    for host in [
        "169.254.169.254",
        "169.254.169.254.",
        "0xa9.0xfe.0xa9.0xfe",
        "0251.0376.0251.0376",
        "2852039166",
        "0xa9fea9fe",
        "169.16689662",
        "169.254.43518",
        "%31%36%39.254.169.254",
        "\u{ff11}\u{ff16}\u{ff19}.254.169.254",
        "[::ffff:169.254.169.254]",
        "[::ffff:a9fe:a9fe]",
        "[0:0:0:0:0:FFFF:A9FE:A9FE]",
        "[64:ff9b::169.254.169.254]",
        "[2002:a9fe:a9fe::]",
    ] {
        let url = format!("http://{host}:80/latest/meta-data");
        assert!(p.precheck_url(&url).is_err(), "{url}");
    }
}
