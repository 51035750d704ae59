//! Admission limits at the HTTP layer: allowed origins, connections per node and per IP address,
//! upgrade attempts per IP per second, and the server API request rate.

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use holdfast_core::config::ClientConfig;
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
    /// Limits from `client.*`.
    pub fn new(c: &ClientConfig) -> Arc<Self> {
        let attempts = NonZeroU32::new(c.connection_rate_limit_per_ip)
            .map(|n| RateLimiter::keyed(Quota::per_second(n)));
        Arc::new(Self {
            per_node: c.connection_limit,
            per_ip: c.connection_limit_per_ip,
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

/// `http_api.rate_limit` requests per second with `http_api.rate_burst`, or none.
pub fn api_rate_limiter(rate: u32, burst: u32) -> Option<DefaultDirectRateLimiter> {
    let rate = NonZeroU32::new(rate)?;
    let burst = NonZeroU32::new(burst).unwrap_or(rate);
    Some(RateLimiter::direct(
        Quota::per_second(rate).allow_burst(burst),
    ))
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
            || holdfast_core::node::glob_match(p.to_ascii_lowercase().as_bytes(), origin.as_bytes())
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
    fn permits_count_and_free() {
        let c = ClientConfig {
            connection_limit: 3,
            connection_limit_per_ip: 2,
            ..ClientConfig::default()
        };
        let l = ConnectionLimits::new(&c);
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
