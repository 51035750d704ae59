//! Admission at the HTTP layer, shared by every transport: allowed origins, connections per node
//! and per IP address, upgrade attempts per IP per second, the client address behind trusted
//! proxies, and a per-key request rate (the server API uses it).

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Why an upgrade was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `client.connection_limit` reached (HTTP 503).
    Node,
    /// `client.connection_limit_per_ip` reached (HTTP 429).
    Ip,
    /// `client.connection_rate_limit_per_ip` exceeded (HTTP 429).
    IpRate,
}

impl Refusal {
    /// Metric label and log text.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Node => "connections_per_node",
            Refusal::Ip => "connections_per_ip",
            Refusal::IpRate => "connection_rate_per_ip",
        }
    }
}

/// Connection counters shared by every upgrade.
pub struct ConnectionLimits {
    per_node: usize,
    per_ip: usize,
    total: AtomicUsize,
    by_ip: Mutex<HashMap<IpAddr, usize>>,
    attempts: Option<DefaultKeyedRateLimiter<IpAddr>>,
}

impl std::fmt::Debug for ConnectionLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionLimits")
            .field("per_node", &self.per_node)
            .field("per_ip", &self.per_ip)
            .field("active", &self.active())
            .finish_non_exhaustive()
    }
}

/// Held for the life of one connection; frees its place on drop.
#[derive(Debug)]
pub struct ConnectionPermit {
    limits: Arc<ConnectionLimits>,
    ip: Option<IpAddr>,
}

impl ConnectionLimits {
    /// Connections on this node at most (`per_node`, 0 = unlimited), from one address
    /// (`per_ip`), and upgrade attempts per address per second (`rate_per_ip`).
    pub fn new(per_node: usize, per_ip: usize, rate_per_ip: u32) -> Arc<Self> {
        let attempts =
            NonZeroU32::new(rate_per_ip).map(|n| RateLimiter::keyed(Quota::per_second(n)));
        Arc::new(Self {
            per_node,
            per_ip,
            total: AtomicUsize::new(0),
            by_ip: Mutex::new(HashMap::new()),
            attempts,
        })
    }

    /// Takes a place for a new connection from `ip` (unknown when embedded without peer
    /// addresses: only the node limit applies then).
    pub fn admit(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<ConnectionPermit, Refusal> {
        if let (Some(rl), Some(ip)) = (&self.attempts, ip)
            && rl.check_key(&ip).is_err()
        {
            return Err(Refusal::IpRate);
        }
        let prev = self.total.fetch_add(1, Ordering::AcqRel);
        if self.per_node > 0 && prev >= self.per_node {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Node);
        }
        if let Some(ip) = ip {
            let mut by_ip = self.by_ip.lock();
            let n = by_ip.entry(ip).or_insert(0);
            if self.per_ip > 0 && *n >= self.per_ip {
                if *n == 0 {
                    by_ip.remove(&ip);
                }
                drop(by_ip);
                self.total.fetch_sub(1, Ordering::AcqRel);
                return Err(Refusal::Ip);
            }
            *n += 1;
        }
        Ok(ConnectionPermit {
            limits: self.clone(),
            ip,
        })
    }

    /// Connections holding a permit.
    pub fn active(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Forgets idle per-IP rate state (call periodically so the map stays bounded).
    pub fn upkeep(&self) {
        if let Some(rl) = &self.attempts {
            rl.retain_recent();
            rl.shrink_to_fit();
        }
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut by_ip = self.limits.by_ip.lock();
            if let Some(n) = by_ip.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    by_ip.remove(&ip);
                }
            }
        }
        self.limits.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `http_api.rate_limit` requests per second with `http_api.rate_burst` for each API key, or
/// none. Keyed by the key presented (with `http_api.insecure`, any key, or none, is its own
/// budget).
pub fn api_rate_limiter(rate: u32, burst: u32) -> Option<DefaultKeyedRateLimiter<String>> {
    let rate = NonZeroU32::new(rate)?;
    let burst = NonZeroU32::new(burst).unwrap_or(rate);
    Some(RateLimiter::keyed(
        Quota::per_second(rate).allow_burst(burst),
    ))
}

/// Networks whose requests may carry the client's address in `Forwarded` or `X-Forwarded-For`
/// (`http_server.trusted_proxies`). Requests from anywhere else are taken at their TCP address:
/// a client cannot choose the address its per-IP limits count against.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    nets: Vec<(IpAddr, u8)>,
}

/// An IPv4 address in IPv6 clothing (`::ffff:10.0.0.1`) is that IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl TrustedProxies {
    /// Parses CIDR blocks (`10.0.0.0/8`, `fd00::/8`) and single addresses.
    pub fn parse(list: &[String]) -> Result<Self, String> {
        let mut nets = Vec::with_capacity(list.len());
        for item in list {
            let (addr, prefix) = match item.split_once('/') {
                Some((a, p)) => (a, Some(p)),
                None => (item.as_str(), None),
            };
            let ip: IpAddr = addr
                .trim()
                .parse()
                .map_err(|_| format!("{item:?} is not an address or CIDR block"))?;
            let ip = canonical(ip);
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let prefix = match prefix {
                Some(p) => p
                    .trim()
                    .parse::<u8>()
                    .ok()
                    .filter(|p| *p <= max)
                    .ok_or_else(|| format!("{item:?}: prefix length must be 0..={max}"))?,
                None => max,
            };
            nets.push((ip, prefix));
        }
        Ok(Self { nets })
    }

    /// Whether no proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets.iter().any(|&(net, prefix)| match (net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        })
    }

    /// The client address of a request that came from `peer`: `peer` itself unless it is a
    /// trusted proxy; behind trusted proxies, the nearest address in `Forwarded` (or else
    /// `X-Forwarded-For`) that is not a trusted proxy, read from the right. An entry that is not
    /// an address stops the walk at the last trusted hop.
    pub fn client_ip(&self, peer: IpAddr, headers: &axum::http::HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.contains(peer) {
            return peer;
        }
        let forwarded: Vec<&str> = headers
            .get_all(axum::http::header::FORWARDED)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|element| {
                element.split(';').find_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    k.trim().eq_ignore_ascii_case("for").then_some(v.trim())
                })
            })
            .collect();
        let hops: Vec<&str> = if forwarded.is_empty() {
            headers
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .collect()
        } else {
            forwarded
        };
        let mut client = peer;
        for hop in hops.iter().rev() {
            let Some(ip) = parse_hop(hop) else { break };
            client = ip;
            if !self.contains(ip) {
                break;
            }
        }
        client
    }
}

/// An address in `X-Forwarded-For` or a `Forwarded` `for=` value: `1.2.3.4`, `1.2.3.4:80`,
/// `"[2001:db8::1]:4711"`, `2001:db8::1`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let h = hop.trim().trim_matches('"');
    if let Ok(ip) = h.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Some(rest) = h.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok().map(canonical);
    }
    let (addr, _port) = h.rsplit_once(':')?;
    addr.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// The authority (`host[:port]`) of an origin such as `https://app.example.com:8443`.
fn origin_authority(origin: &str) -> Option<&str> {
    let (_, rest) = origin.split_once("://")?;
    let authority = rest.split('/').next()?;
    (!authority.is_empty()).then_some(authority)
}

/// Whether a browser origin may open a connection. No `Origin` header (not a browser) is
/// allowed; with no patterns the origin's host must be the request's `Host`.
pub fn origin_allowed(patterns: &[String], origin: Option<&str>, host: Option<&str>) -> bool {
    let Some(origin) = origin else {
        return true;
    };
    let origin = origin.to_ascii_lowercase();
    if patterns.is_empty() {
        let (Some(a), Some(host)) = (origin_authority(&origin), host) else {
            return false;
        };
        return a == host.to_ascii_lowercase();
    }
    patterns.iter().any(|p| {
        p == "*"
            || holdfast_core::glob::glob_match(p.to_ascii_lowercase().as_bytes(), origin.as_bytes())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let none: Vec<String> = vec![];
        assert!(origin_allowed(&none, None, Some("a.com")));
        assert!(origin_allowed(&none, Some("https://a.com"), Some("a.com")));
        assert!(origin_allowed(
            &none,
            Some("http://A.com:8000"),
            Some("a.com:8000")
        ));
        assert!(!origin_allowed(
            &none,
            Some("https://evil.com"),
            Some("a.com")
        ));
        assert!(!origin_allowed(
            &none,
            Some("https://a.com"),
            Some("a.com:8000")
        ));
        assert!(!origin_allowed(&none, Some("null"), Some("a.com")));
        assert!(!origin_allowed(&none, Some("https://a.com"), None));
        let p = vec![
            "https://*.example.com".to_owned(),
            "http://localhost:3000".to_owned(),
        ];
        assert!(origin_allowed(
            &p,
            Some("https://app.example.com"),
            Some("x")
        ));
        assert!(origin_allowed(&p, Some("http://localhost:3000"), Some("x")));
        assert!(!origin_allowed(
            &p,
            Some("https://example.com.evil.net"),
            Some("x")
        ));
        assert!(!origin_allowed(
            &p,
            Some("http://localhost:3001"),
            Some("x")
        ));
        assert!(origin_allowed(&["*".to_owned()], Some("https://any"), None));
    }

    #[test]
    fn client_address_behind_trusted_proxies_only() {
        use axum::http::{HeaderMap, HeaderValue};
        let ip = |s: &str| s.parse::<IpAddr>().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let t = TrustedProxies::parse(&["10.0.0.0/8".into(), "::1".into()]).expect("parse");
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("203.0.113.9, 10.1.2.3"),
        );
        assert_eq!(
            t.client_ip(ip("10.0.0.5"), &h),
            ip("203.0.113.9"),
            "behind two proxies"
        );
        assert_eq!(
            t.client_ip(ip("198.51.100.7"), &h),
            ip("198.51.100.7"),
            "an untrusted peer cannot choose its address"
        );
        assert_eq!(
            t.client_ip(ip("::ffff:10.0.0.5"), &h),
            ip("203.0.113.9"),
            "IPv4-mapped peer"
        );
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("1.1.1.1, 203.0.113.9"),
        );
        assert_eq!(
            t.client_ip(ip("10.0.0.5"), &h),
            ip("203.0.113.9"),
            "the left part is the client's own claim: only the nearest untrusted hop counts"
        );
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("junk, 10.2.2.2"),
        );
        assert_eq!(
            t.client_ip(ip("10.0.0.5"), &h),
            ip("10.2.2.2"),
            "stops at junk"
        );
        h.insert(
            axum::http::header::FORWARDED,
            HeaderValue::from_static("for=192.0.2.60;proto=http, for=\"[2001:db8:cafe::17]:4711\""),
        );
        assert_eq!(
            t.client_ip(ip("::1"), &h),
            ip("2001:db8:cafe::17"),
            "Forwarded wins"
        );
        assert!(TrustedProxies::parse(&["10.0.0.0/33".into()]).is_err());
        assert!(TrustedProxies::parse(&["nope".into()]).is_err());
        let none = TrustedProxies::default();
        assert_eq!(none.client_ip(ip("10.0.0.5"), &h), ip("10.0.0.5"));
        assert_eq!(parse_hop("192.0.2.1:8080"), Some(ip("192.0.2.1")));
    }

    #[test]
    fn permits_count_and_free() {
        let l = ConnectionLimits::new(3, 2, 0);
        let a: IpAddr = "10.0.0.1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let b: IpAddr = "10.0.0.2".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let p1 = l.admit(Some(a)).ok();
        let p2 = l.admit(Some(a)).ok();
        assert!(p1.is_some() && p2.is_some());
        assert_eq!(l.admit(Some(a)).err(), Some(Refusal::Ip));
        let p3 = l.admit(Some(b)).ok();
        assert!(p3.is_some());
        assert_eq!(l.admit(Some(b)).err(), Some(Refusal::Node));
        drop(p1);
        assert_eq!(l.active(), 2);
        assert!(l.admit(Some(a)).is_ok());
        drop((p2, p3));
        assert_eq!(l.active(), 0);
        assert!(l.by_ip.lock().is_empty());
    }
}
