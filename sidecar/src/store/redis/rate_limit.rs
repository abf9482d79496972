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

#[cfg(test)]
mod tests {
    use super::super::tests::{cluster_url, server_port};
    use super::super::Subscribe;
    use super::*;

    async fn shared_budget(url: &str) {
        // Two hubs: two gateway replicas on one store.
        let a = RedisHub::connect(url, Subscribe::All).unwrap();
        let b = RedisHub::connect(url, Subscribe::All).unwrap();
        let rate = Rate::new(1.0, Some(3)).unwrap();
        let key = format!("k-{}", uuid::Uuid::new_v4());
        assert_eq!(a.rate_limit(&key, rate).await.unwrap(), None);
        assert_eq!(b.rate_limit(&key, rate).await.unwrap(), None);
        assert_eq!(a.rate_limit(&key, rate).await.unwrap(), None);
        let wait = b
            .rate_limit(&key, rate)
            .await
            .unwrap()
            .expect("over the shared burst");
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        assert!(a.acquire(&key, rate).await.is_err(), "still over the rate");
        // Another key has its own budget.
        let other = format!("k-{}", uuid::Uuid::new_v4());
        assert_eq!(a.rate_limit(&other, rate).await.unwrap(), None);
        // After the wait one more passes.
        tokio::time::sleep(wait + Duration::from_millis(20)).await;
        assert_eq!(b.rate_limit(&key, rate).await.unwrap(), None);
    }

    #[tokio::test]
    async fn two_hubs_spend_one_budget() {
        shared_budget(&format!("redis://127.0.0.1:{}/0", server_port())).await;
    }

    #[tokio::test]
    async fn two_hubs_spend_one_budget_on_a_cluster() {
        shared_budget(&cluster_url()).await;
    }

    #[tokio::test]
    async fn a_dead_store_lets_calls_through() {
        let hub = RedisHub::connect("redis://127.0.0.1:1/0", Subscribe::All).unwrap();
        let rate = Rate::new(1.0, Some(1)).unwrap();
        assert!(hub.rate_limit("k", rate).await.is_err());
        assert!(hub.acquire("k", rate).await.is_ok());
        assert!(hub.acquire("k", rate).await.is_ok());
    }
}
