//! Per-key rate limits: GCRA (the generic cell rate algorithm — one stored instant per
//! key, no background refill), decided here as a pure function, kept in memory for a
//! single process or in the shared store (`store::redis`, the same arithmetic in Lua)
//! so every gateway replica spends one budget.
//!
//! Against the shared store a gateway takes tokens in small batches ([`Leased`]): a
//! batch is debited from the one budget before any of it is spent, so gateways never
//! admit more than the limit together; a batch is at most 10 ms of the rate (and a
//! quarter of the burst), so a key at 10 req/s still asks the store every time while a
//! key at 100,000 req/s asks once per thousand requests.

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
    gcra_take(tat_us, now_us, rate, 1).map(|(_, tat)| tat)
}

/// GCRA for up to `want` requests at once: `(granted ≥ 1, the new instant)`, or how long
/// until one would pass. Granting n is exactly n single steps in a row.
pub fn gcra_take(
    tat_us: Option<u64>,
    now_us: u64,
    rate: Rate,
    want: u64,
) -> Result<(u64, u64), Duration> {
    let tat = tat_us.unwrap_or(now_us).max(now_us);
    let window = rate.interval_us * u64::from(rate.burst);
    // Requests that fit: the largest n with tat + n·interval − now ≤ window.
    let fits = (now_us + window).saturating_sub(tat) / rate.interval_us;
    if fits == 0 {
        return Err(Duration::from_micros(
            tat + rate.interval_us - now_us - window,
        ));
    }
    let n = fits.min(want.max(1));
    Ok((n, tat + n * rate.interval_us))
}

/// Tokens one [`Leased`] batch asks for: 10 ms of the rate, at most a quarter of the
/// burst, at least one.
pub fn batch(rate: Rate) -> u64 {
    let per_10ms = 10_000 / rate.interval_us;
    per_10ms.min(u64::from(rate.burst / 4)).max(1)
}

/// Where a key's rate is counted.
#[async_trait::async_trait]
pub trait RateLimiter: Send + Sync {
    /// `Ok` when the request may go now; `Err(wait)` when it is over the rate. A limiter
    /// that cannot count (store down) lets the request through.
    async fn acquire(&self, key_id: &str, rate: Rate) -> Result<(), Duration>;
}

/// A shared budget that hands out tokens in batches (the Redis store).
#[async_trait::async_trait]
pub trait TokenSource: Send + Sync {
    /// Up to `want` tokens of `key_id` (`Ok(Ok(granted))`), or the wait until one
    /// (`Ok(Err(wait))`); `Err` when the budget cannot be reached.
    async fn take(
        &self,
        key_id: &str,
        rate: Rate,
        want: u64,
    ) -> Result<Result<u64, Duration>, String>;
}

/// Tokens left of a batch are dropped after this long: a batch is spent promptly or
/// not at all, so no gateway sits on budget another could use.
const LEASE_TTL: Duration = Duration::from_millis(100);

/// Batches of a [`TokenSource`], spent in this process (see the module docs). While
/// the source answers "wait", this process answers the same without asking again.
pub struct Leased<S> {
    source: S,
    leases: Mutex<HashMap<String, Lease>>,
}

#[derive(Clone, Copy)]
struct Lease {
    tokens: u64,
    until: std::time::Instant,
    denied_until: Option<std::time::Instant>,
}

impl<S: TokenSource> Leased<S> {
    pub fn new(source: S) -> Leased<S> {
        Leased {
            source,
            leases: Mutex::new(HashMap::new()),
        }
    }

    /// A token of this process's batch, or the wait it knows of; `None`: ask the source.
    fn local(&self, key_id: &str, now: std::time::Instant) -> Option<Result<(), Duration>> {
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        let l = leases.get_mut(key_id)?;
        if l.tokens > 0 && now < l.until {
            l.tokens -= 1;
            return Some(Ok(()));
        }
        match l.denied_until {
            Some(t) if now < t => Some(Err(t - now)),
            _ => None,
        }
    }

    fn record(&self, key_id: &str, lease: Lease) {
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        if leases.len() > 10_000 {
            let now = std::time::Instant::now();
            leases.retain(|_, l| now < l.until || l.denied_until.is_some_and(|t| now < t));
        }
        match leases.get_mut(key_id) {
            Some(l) => {
                // Tokens another request fetched meanwhile are kept (both were debited).
                let kept = if std::time::Instant::now() < l.until {
                    l.tokens
                } else {
                    0
                };
                *l = Lease {
                    tokens: lease.tokens + kept,
                    ..lease
                };
            }
            None => {
                leases.insert(key_id.to_string(), lease);
            }
        }
    }
}

#[async_trait::async_trait]
impl<S: TokenSource> RateLimiter for Leased<S> {
    async fn acquire(&self, key_id: &str, rate: Rate) -> Result<(), Duration> {
        let now = std::time::Instant::now();
        if let Some(r) = self.local(key_id, now) {
            return r;
        }
        match self.source.take(key_id, rate, batch(rate)).await {
            Ok(Ok(n)) => {
                self.record(
                    key_id,
                    Lease {
                        tokens: n.saturating_sub(1),
                        until: now + LEASE_TTL,
                        denied_until: None,
                    },
                );
                Ok(())
            }
            Ok(Err(wait)) => {
                self.record(
                    key_id,
                    Lease {
                        tokens: 0,
                        until: now,
                        denied_until: Some(now + wait),
                    },
                );
                Err(wait)
            }
            Err(e) => {
                // Counting is down with the store: let the call through (its own store
                // work fails clearly if it needs the store), and say so now and then.
                static LAST: Mutex<Option<std::time::Instant>> = Mutex::new(None);
                let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
                if last.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!(error = %e, "rate limits are not counted while the store is unavailable");
                    *last = Some(std::time::Instant::now());
                }
                Ok(())
            }
        }
    }
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

    #[test]
    fn batches_are_single_steps_in_a_row() {
        let rate = Rate::new(100.0, Some(10)).unwrap();
        let t0 = 7_000_000;
        // Ten at once from a fresh key: all of the burst, the same instant as ten steps.
        let (n, tat) = gcra_take(None, t0, rate, 50).unwrap();
        let mut one = None;
        for _ in 0..10 {
            one = Some(gcra(one, t0, rate).unwrap());
        }
        assert_eq!((n, Some(tat)), (10, one));
        assert_eq!(
            gcra_take(Some(tat), t0, rate, 5).unwrap_err(),
            gcra(one, t0, rate).unwrap_err()
        );
        // Part of a batch when only part fits.
        assert_eq!(gcra_take(Some(tat), t0 + 25_000, rate, 5).unwrap().0, 2);
        assert_eq!(batch(rate), 1);
        assert_eq!(batch(Rate::new(1e6, Some(1_000_000)).unwrap()), 10_000);
        assert_eq!(batch(Rate::new(1e5, Some(8)).unwrap()), 2);
    }

    /// A budget in memory standing for the store, shared by two [`Leased`] "gateways".
    struct Shared(Mutex<HashMap<String, u64>>, std::sync::atomic::AtomicU64);

    #[async_trait::async_trait]
    impl TokenSource for std::sync::Arc<Shared> {
        async fn take(
            &self,
            key: &str,
            rate: Rate,
            want: u64,
        ) -> Result<Result<u64, Duration>, String> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut m = self.0.lock().unwrap();
            let now = now_us();
            Ok(
                gcra_take(m.get(key).copied(), now, rate, want).map(|(n, tat)| {
                    m.insert(key.to_string(), tat);
                    n
                }),
            )
        }
    }

    #[tokio::test]
    async fn leased_gateways_never_admit_more_than_the_budget() {
        let shared = std::sync::Arc::new(Shared(Mutex::new(HashMap::new()), 0.into()));
        let (a, b) = (Leased::new(shared.clone()), Leased::new(shared.clone()));
        // A slow key: every request asks the store, and the burst is exact.
        let slow = Rate::new(0.01, Some(5)).unwrap();
        let admitted = futures_util::future::join_all((0..20).map(|i| {
            let g = if i % 2 == 0 { &a } else { &b };
            g.acquire("slow", slow)
        }))
        .await;
        assert_eq!(admitted.iter().filter(|r| r.is_ok()).count(), 5);
        // A fast key: a handful of store calls for thousands of requests.
        let fast = Rate::new(1e6, Some(1_000_000)).unwrap();
        shared.1.store(0, std::sync::atomic::Ordering::Relaxed);
        for i in 0..2000 {
            let g = if i % 3 == 0 { &a } else { &b };
            assert!(g.acquire("fast", fast).await.is_ok());
        }
        let calls = shared.1.load(std::sync::atomic::Ordering::Relaxed);
        assert!(calls <= 4, "{calls} store calls for 2000 requests");
        // A key at its limit: together the gateways admit no more than burst + rate × time.
        let tight = Rate::new(1e5, Some(1000)).unwrap();
        let t0 = std::time::Instant::now();
        let mut ok = 0u64;
        for i in 0..20_000 {
            let g = if i % 2 == 0 { &a } else { &b };
            ok += g.acquire("tight", tight).await.is_ok() as u64;
        }
        let bound = 1000 + (t0.elapsed().as_micros() as u64) / 10 + 1;
        assert!(ok <= bound, "{ok} admitted, bound {bound}");
        assert!(ok >= 1000, "{ok}: the burst passes");
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
