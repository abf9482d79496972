//! Per-key rate limits in the shared store: every gateway replica spends one budget.
//! One Lua call per request of a rate-limited key (`rate_limit.lua`, GCRA on the
//! server's clock); keys without a limit never reach Redis.

use std::sync::OnceLock;
use std::time::Duration;

use redis::{Script, Value};

use super::{int_of, RedisHub};
use crate::auth::ratelimit::{Rate, RateLimiter};

fn script() -> &'static Script {
    static S: OnceLock<Script> = OnceLock::new();
    S.get_or_init(|| Script::new(include_str!("rate_limit.lua")))
}

/// The store key of a key id's rate state.
pub fn rate_key(key_id: &str) -> String {
    format!("fal:ratelimit:{{{key_id}}}")
}

impl RedisHub {
    /// One GCRA step for `key_id`: `None` when the request may go, else the wait.
    pub async fn rate_limit(
        &self,
        key_id: &str,
        rate: Rate,
    ) -> super::StoreResult<Option<Duration>> {
        let mut inv = script().prepare_invoke();
        inv.key(rate_key(key_id))
            .arg(rate.interval_us())
            .arg(rate.burst());
        let inv = &inv;
        let v: Value = self
            .guard(|mut c| async move { inv.invoke_async::<Value>(&mut c).await })
            .await?;
        Ok(match int_of(&v) {
            Some(us) if us > 0 => Some(Duration::from_micros(us as u64)),
            _ => None,
        })
    }
}

#[async_trait::async_trait]
impl RateLimiter for RedisHub {
    async fn acquire(&self, key_id: &str, rate: Rate) -> Result<(), Duration> {
        match self.rate_limit(key_id, rate).await {
            Ok(None) => Ok(()),
            Ok(Some(wait)) => Err(wait),
            Err(e) => {
                // Counting is down with the store: let the call through (its own store
                // work fails clearly if it needs the store), and say so now and then.
                static LAST: std::sync::Mutex<Option<std::time::Instant>> =
                    std::sync::Mutex::new(None);
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
