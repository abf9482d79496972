//! Per-key rate limits in the shared store: every gateway replica spends one budget.
//! A [`Leased`](crate::auth::ratelimit::Leased) limiter takes tokens here in batches
//! (`lua/rate_limit.lua`, GCRA on the server's clock); keys without a limit never
//! reach Redis.

use std::sync::OnceLock;
use std::time::Duration;

use redis::{Script, Value};

use super::reply::{array, int_of};
use super::RedisHub;
use crate::auth::ratelimit::{Rate, TokenSource};

fn script() -> &'static Script {
    static S: OnceLock<Script> = OnceLock::new();
    S.get_or_init(|| Script::new(include_str!("lua/rate_limit.lua")))
}

/// The store key of a key id's rate state.
pub fn rate_key(key_id: &str) -> String {
    format!("fal:ratelimit:{{{key_id}}}")
}

impl RedisHub {
    /// Up to `want` GCRA steps for `key_id` at once: the tokens granted (≥ 1), or the
    /// wait until one would be.
    pub async fn rate_take(
        &self,
        key_id: &str,
        rate: Rate,
        want: u64,
    ) -> crate::store::StoreResult<Result<u64, Duration>> {
        let mut inv = script().prepare_invoke();
        inv.key(rate_key(key_id))
            .arg(rate.interval_us())
            .arg(rate.burst())
            .arg(want);
        let inv = &inv;
        let v: Value = self
            .guard(|mut c| async move { inv.invoke_async::<Value>(&mut c).await })
            .await?;
        let v = array(v)?;
        let (granted, wait) = (
            v.first().and_then(int_of).unwrap_or(0),
            v.get(1).and_then(int_of).unwrap_or(0),
        );
        Ok(if granted > 0 {
            Ok(granted as u64)
        } else {
            Err(Duration::from_micros(wait.max(1) as u64))
        })
    }
}

#[async_trait::async_trait]
impl TokenSource for std::sync::Arc<RedisHub> {
    async fn take(
        &self,
        key_id: &str,
        rate: Rate,
        want: u64,
    ) -> Result<Result<u64, Duration>, String> {
        self.rate_take(key_id, rate, want)
            .await
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{cluster_url, server_port};
    use super::super::Subscribe;
    use super::*;
    use crate::auth::ratelimit::{Leased, RateLimiter};

    async fn shared_budget(url: &str) {
        // Two hubs: two gateway replicas on one store.
        let a = RedisHub::connect(url, Subscribe::All).unwrap();
        let b = RedisHub::connect(url, Subscribe::All).unwrap();
        let rate = Rate::new(1.0, Some(3)).unwrap();
        let key = format!("k-{}", uuid::Uuid::new_v4());
        assert_eq!(a.rate_take(&key, rate, 1).await.unwrap(), Ok(1));
        assert_eq!(b.rate_take(&key, rate, 1).await.unwrap(), Ok(1));
        assert_eq!(a.rate_take(&key, rate, 1).await.unwrap(), Ok(1));
        let wait = b
            .rate_take(&key, rate, 1)
            .await
            .unwrap()
            .expect_err("over the shared burst");
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        let leased = Leased::new(a.clone());
        assert!(
            leased.acquire(&key, rate).await.is_err(),
            "still over the rate"
        );
        // Another key has its own budget; a batch takes what fits.
        let other = format!("k-{}", uuid::Uuid::new_v4());
        assert_eq!(a.rate_take(&other, rate, 10).await.unwrap(), Ok(3));
        // After the wait one more passes.
        tokio::time::sleep(wait + Duration::from_millis(20)).await;
        assert_eq!(b.rate_take(&key, rate, 1).await.unwrap(), Ok(1));
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
        assert!(hub.rate_take("k", rate, 1).await.is_err());
        let leased = Leased::new(hub);
        assert!(leased.acquire("k", rate).await.is_ok());
        assert!(leased.acquire("k", rate).await.is_ok());
    }
}
