//! Whose word the client address is (a leaf: the token service reads the
//! address by it, and the operator checks `spec.trustedProxies` with it). `X-Forwarded-For` is honoured only on
//! a connection from a trusted proxy (`--trusted-proxies`), and then read
//! from the right: each hop that is itself a trusted proxy is passed over,
//! and the first that is not is the client. A client talking to the service
//! directly cannot choose its address, and the hops a client writes to the
//! left of what its proxies appended are never used.

use std::net::IpAddr;

use axum::http::HeaderMap;
use ipnet::IpNet;

/// The proxies whose `X-Forwarded-For` entries count.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Ranges as `10.0.0.0/8`, `fd00::/8`, or single addresses.
    pub fn parse<S: AsRef<str>>(ranges: &[S]) -> Result<Self, String> {
        ranges
            .iter()
            .map(|r| r.as_ref().trim())
            .filter(|r| !r.is_empty())
            .map(|r| {
                r.parse::<IpNet>()
                    .or_else(|_| r.parse::<IpAddr>().map(IpNet::from))
                    .map(|n| n.trunc())
                    .map_err(|_| format!("{r:?} is not an address range (CIDR) or an address"))
            })
            .collect::<Result<_, _>>()
            .map(TrustedProxies)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|n| n.contains(&ip))
    }
}

/// An IPv4 address written as IPv6 (`::ffff:192.0.2.1`) is that IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// What the headers say of the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddress {
    pub ip: Option<IpAddr>,
    /// A hop that had to be read was not an address: the nearest proxy's
    /// address was taken instead.
    pub invalid_hop: bool,
}

/// The client's address: `peer`'s, unless `peer` is a trusted proxy; then
/// the nearest `X-Forwarded-For` hop (over every such header, in order)
/// that is not a trusted proxy itself. A hop that is not an address stops
/// the walk at the proxy that wrote it.
pub fn client_address(
    trusted: &TrustedProxies,
    headers: &HeaderMap,
    peer: Option<IpAddr>,
) -> ClientAddress {
    let mut at = ClientAddress {
        ip: peer.map(canonical),
        invalid_hop: false,
    };
    let Some(mut nearest) = at.ip else {
        return at;
    };
    let fields: Vec<&[u8]> = headers
        .get_all("x-forwarded-for")
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .collect();
    for hop in fields.into_iter().rev() {
        if !trusted.contains(nearest) {
            break;
        }
        match std::str::from_utf8(hop.trim_ascii()).map(str::parse::<IpAddr>) {
            Ok(Ok(ip)) => nearest = canonical(ip),
            _ => {
                at.invalid_hop = true;
                break;
            }
        }
    }
    at.ip = Some(nearest);
    at
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::api_server::headers;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn trusted(r: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(r).unwrap()
    }

    #[test]
    fn ranges_parse_and_bad_ones_are_named() {
        let t = trusted(&["10.0.0.0/8", " 192.0.2.7 ", "fd00::/8", ""]);
        assert!(t.contains(ip("10.1.2.3")));
        assert!(t.contains(ip("192.0.2.7")));
        assert!(!t.contains(ip("192.0.2.8")));
        assert!(t.contains(ip("fd12::1")));
        assert!(t.contains(ip("::ffff:10.9.9.9")), "IPv4-mapped");
        assert!(!t.contains(ip("11.0.0.1")));
        // Host bits set are the range's.
        assert!(trusted(&["10.1.2.3/8"]).contains(ip("10.200.0.1")));
        let e = TrustedProxies::parse(&["10.0.0.0/33"]).unwrap_err();
        assert!(e.contains("\"10.0.0.0/33\""), "{e}");
        assert!(TrustedProxies::parse(&["ingress"]).is_err());
        assert!(TrustedProxies::parse::<&str>(&[]).unwrap().is_empty());
    }

    #[test]
    fn a_client_that_is_not_a_trusted_proxy_cannot_choose_its_address() {
        let t = trusted(&["10.0.0.0/8"]);
        let h = headers(&[("x-forwarded-for", "198.51.100.9")]);
        let direct = client_address(&t, &h, Some(ip("203.0.113.5")));
        assert_eq!(direct.ip, Some(ip("203.0.113.5")));
        // Nobody trusted: the header never counts.
        let none = client_address(&TrustedProxies::default(), &h, Some(ip("10.0.0.1")));
        assert_eq!(none.ip, Some(ip("10.0.0.1")));
    }

    #[test]
    fn behind_trusted_proxies_the_nearest_untrusted_hop_is_the_client() {
        let t = trusted(&["10.0.0.0/8"]);
        let peer = Some(ip("10.0.0.1"));
        // The client wrote the first entry itself; the proxy appended the second.
        let h = headers(&[("x-forwarded-for", "1.2.3.4, 198.51.100.9")]);
        assert_eq!(client_address(&t, &h, peer).ip, Some(ip("198.51.100.9")));
        // Two proxies: an inner one (10.x) is passed over.
        let h = headers(&[("x-forwarded-for", "1.2.3.4, 198.51.100.9, 10.0.0.7")]);
        assert_eq!(client_address(&t, &h, peer).ip, Some(ip("198.51.100.9")));
        // Over several headers, in order.
        let h = headers(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "198.51.100.9, 10.0.0.7"),
        ]);
        assert_eq!(client_address(&t, &h, peer).ip, Some(ip("198.51.100.9")));
        // Every hop a trusted proxy: the farthest one.
        let h = headers(&[("x-forwarded-for", "10.0.0.8, 10.0.0.7")]);
        assert_eq!(client_address(&t, &h, peer).ip, Some(ip("10.0.0.8")));
        // No header: the proxy itself.
        assert_eq!(client_address(&t, &HeaderMap::new(), peer).ip, peer);
        // IPv4-mapped peer and hop.
        let h = headers(&[("x-forwarded-for", "::ffff:198.51.100.9")]);
        let mapped = client_address(&t, &h, Some(ip("::ffff:10.0.0.1")));
        assert_eq!(mapped.ip, Some(ip("198.51.100.9")));
    }

    #[test]
    fn a_hop_that_is_not_an_address_stops_at_the_proxy_that_wrote_it() {
        let t = trusted(&["10.0.0.0/8"]);
        let peer = Some(ip("10.0.0.1"));
        for bad in [
            "198.51.100.9, not-an-ip",
            "198.51.100.9,",
            "198.51.100.9, 10.0.0.7, x",
        ] {
            let h = headers(&[("x-forwarded-for", bad)]);
            let got = client_address(&t, &h, peer);
            assert!(got.invalid_hop, "{bad}");
            assert_eq!(got.ip, peer, "{bad}");
        }
        let h = headers(&[("x-forwarded-for", "junk, 10.0.0.7")]);
        let got = client_address(&t, &h, peer);
        assert_eq!((got.ip, got.invalid_hop), (Some(ip("10.0.0.7")), true));
    }
}
