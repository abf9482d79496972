//! The webhook URL guard on arbitrary strings: never a panic; a URL accepted without
//! DNS is an IP literal the guard allows (never a refused address however spelled).
#![no_main]

use std::net::IpAddr;

use fal_sidecar::webhook::ssrf::{blocked_reason, Policy, Precheck};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    let policy = Policy::new(&[], false).unwrap();
    let candidates = [raw.to_string(), format!("http://{raw}/"), format!("https://[{raw}]:1/")];
    for url in &candidates {
        if let Ok(Precheck::Accepted(u)) = policy.precheck_url(url) {
            let ip = match u.host() {
                Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
                Some(url::Host::Ipv6(v6)) => IpAddr::V6(v6),
                other => panic!("{url}: accepted without a check: {other:?}"),
            };
            assert!(blocked_reason(ip).is_none(), "{url} -> {ip}");
        }
    }
    // The same invariant on raw address bytes.
    if data.len() >= 16 {
        let ip = IpAddr::from(<[u8; 16]>::try_from(&data[..16]).unwrap());
        let mapped = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
            _ => None,
        };
        if let Some(v4) = mapped {
            assert_eq!(blocked_reason(ip).is_some(), blocked_reason(v4).is_some(), "{ip}");
        }
    }
});
