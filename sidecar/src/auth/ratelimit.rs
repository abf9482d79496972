//! Per-key rate limits: GCRA (the generic cell rate algorithm — one stored instant per
//! key, no background refill), decided here as a pure function, kept in memory for a
//! single process or in the shared store (`store::redis`, the same arithmetic in Lua)
//! so every gateway replica spends one budget.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// A key's limit: a steady rate and how many requests may come at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Microseconds between requests at the steady rate.
    interval_us: u64,
    burst: u32,
}

impl Rate {
    /// `requests_per_second` in (0, 1e6]; `burst` ≥ 1 [default: ceil(rate), at least 1].
    pub fn new(requests_per_second: f64, burst: Option<u32>) -> Result<Rate, String> {
        if !(requests_per_second.is_finite()
            && requests_per_second > 0.0
            && requests_per_second <= 1e6)
        {
            return Err(format!(
                "requestsPerSecond must be above 0 and at most 1000000, not {requests_per_second}"
            ));
        }
        let burst = match burst {
            Some(0) => return Err("burst must be at least 1".into()),
            Some(b) => b,
            None => (requests_per_second.ceil() as u32).max(1),
        };
        Ok(Rate {
            interval_us: ((1e6 / requests_per_second).round() as u64).max(1),
            burst,
        })
    }

    pub fn interval_us(&self) -> u64 {
        self.interval_us
    }

    pub fn burst(&self) -> u32 {
        self.burst
    }
}

/// One GCRA step. `tat_us`: the stored theoretical arrival time (none: a fresh key).
/// Allowed: the new instant to store. Refused: how long until one request would pass.
pub fn gcra(tat_us: Option<u64>, now_us: u64, rate: Rate) -> Result<u64, Duration> {
    let tat = tat_us.unwrap_or(now_us).max(now_us);
    let new_tat = tat + rate.interval_us;
    let window = rate.interval_us * u64::from(rate.burst);
    if new_tat - now_us <= window {
        Ok(new_tat)
    } else {
        Err(Duration::from_micros(new_tat - now_us - window))
    }
}

/// Where a key's rate is counted.
#[async_trait::async_trait]
pub trait RateLimiter: Send + Sync {
    /// `Ok` when the request may go now; `Err(wait)` when it is over the rate. A limiter
    /// that cannot count (store down) lets the request through.
    async fn acquire(&self, key_id: &str, rate: Rate) -> Result<(), Duration>;
}

/// Counts in this process (`fal-sidecar run --keys`: one process is the whole budget).
#[derive(Default)]
pub struct MemoryLimiter {
    tats: Mutex<HashMap<String, u64>>,
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[async_trait::async_trait]
impl RateLimiter for MemoryLimiter {
    async fn acquire(&self, key_id: &str, rate: Rate) -> Result<(), Duration> {
        let now = now_us();
        let mut tats = self.tats.lock().unwrap_or_else(|e| e.into_inner());
        // Keys idle past their window hold no state worth keeping.
        if tats.len() > 10_000 {
            tats.retain(|_, t| *t > now);
        }
        let tat = tats.get(key_id).copied();
        let next = gcra(tat, now, rate)?;
        tats.insert(key_id.to_string(), next);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_defaults() {
        let r = Rate::new(10.0, Some(20)).unwrap();
        assert_eq!((r.interval_us(), r.burst()), (100_000, 20));
        assert_eq!(Rate::new(2.5, None).unwrap().burst(), 3);
        assert_eq!(Rate::new(0.1, None).unwrap().burst(), 1);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 2e6] {
            assert!(Rate::new(bad, None).is_err(), "{bad}");
        }
        assert!(Rate::new(1.0, Some(0)).is_err());
    }

    #[test]
    fn a_burst_then_the_steady_rate() {
        let rate = Rate::new(10.0, Some(3)).unwrap();
        let mut tat = None;
        let t0 = 1_000_000_000;
        for _ in 0..3 {
            tat = Some(gcra(tat, t0, rate).unwrap());
        }
        let wait = gcra(tat, t0, rate).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        // Refused requests do not spend budget; after the wait one more passes.
        assert!(gcra(tat, t0 + 99_999, rate).is_err());
        tat = Some(gcra(tat, t0 + 100_000, rate).unwrap());
        assert!(gcra(tat, t0 + 100_000, rate).is_err());
        // Idle for a long time: the full burst again, not more.
        let later = t0 + 60_000_000;
        let mut t = tat;
        for _ in 0..3 {
            t = Some(gcra(t, later, rate).unwrap());
        }
        assert!(gcra(t, later, rate).is_err());
    }

    #[test]
    fn steady_traffic_at_the_rate_always_passes() {
        let rate = Rate::new(50.0, Some(1)).unwrap();
        let mut tat = None;
        for i in 0..1000u64 {
            tat = Some(gcra(tat, 5_000_000 + i * 20_000, rate).unwrap());
        }
    }

    #[tokio::test]
    async fn memory_limiter_keeps_keys_apart() {
        let l = MemoryLimiter::default();
        let rate = Rate::new(1.0, Some(2)).unwrap();
        assert!(l.acquire("a", rate).await.is_ok());
        assert!(l.acquire("a", rate).await.is_ok());
        let wait = l.acquire("a", rate).await.unwrap_err();
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(l.acquire("b", rate).await.is_ok());
    }
}
