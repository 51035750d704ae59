//! Per-connection command rate limiting: a token bucket small enough to live in every session.

use tokio::time::Instant;

/// Tokens refill at `rate` per second up to `burst`; each command takes one.
#[derive(Debug)]
pub struct TokenBucket {
    tokens: f64,
    last: Option<Instant>,
    refused: u32,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(burst: u32) -> Self {
        Self {
            tokens: f64::from(burst),
            last: None,
            refused: 0,
        }
    }

    /// Takes a token if one is there; counts refusals in a row otherwise.
    pub fn take(&mut self, rate: u32, burst: u32, now: Instant) -> bool {
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * f64::from(rate)).min(f64::from(burst));
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.refused = 0;
            true
        } else {
            self.refused = self.refused.saturating_add(1);
            false
        }
    }

    /// Commands refused since the last one accepted.
    pub fn refused_in_a_row(&self) -> u32 {
        self.refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(3);
        assert!((0..3).all(|_| b.take(10, 3, t0)));
        assert!(!b.take(10, 3, t0));
        assert!(!b.take(10, 3, t0));
        assert_eq!(b.refused_in_a_row(), 2);
        // 100 ms at 10/s refills one token.
        assert!(b.take(10, 3, t0 + Duration::from_millis(100)));
        assert_eq!(b.refused_in_a_row(), 0);
        assert!(!b.take(10, 3, t0 + Duration::from_millis(100)));
        // A long pause refills only up to the burst.
        let later = t0 + Duration::from_secs(60);
        assert!((0..3).all(|_| b.take(10, 3, later)));
        assert!(!b.take(10, 3, later));
    }
}
