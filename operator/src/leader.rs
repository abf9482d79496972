//! Leader election through a `coordination.k8s.io` Lease, so two controller replicas
//! are safe: only the holder reconciles and scales. The holder renews every
//! [`RENEW`]; a Lease not renewed for [`LEASE_SECONDS`] may be taken over. A holder
//! that cannot renew in time stops acting (it exits, and Kubernetes restarts it as a
//! follower), the way controller-runtime does.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

/// Seconds a Lease stays valid without renewal.
pub const LEASE_SECONDS: i32 = 15;
/// How often the holder renews.
pub const RENEW: Duration = Duration::from_secs(5);
/// How often a follower tries to take the Lease.
pub const RETRY: Duration = Duration::from_secs(2);

/// True when `lease` is free for `me`: unheld, held by `me`, or expired at `now`.
pub fn can_take(lease: &Lease, me: &str, now: Timestamp) -> bool {
    let Some(spec) = &lease.spec else { return true };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() || holder == me {
        return true;
    }
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS));
    match &spec.renew_time {
        Some(MicroTime(t)) => now.as_second() > t.as_second() + duration,
        None => true,
    }
}

fn taken(mut lease: Lease, me: &str, now: Timestamp) -> Lease {
    let mut spec = lease.spec.take().unwrap_or_default();
    if spec.holder_identity.as_deref() != Some(me) {
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.holder_identity = Some(me.to_string());
    spec.lease_duration_seconds = Some(LEASE_SECONDS);
    spec.renew_time = Some(MicroTime(now));
    lease.spec = Some(spec);
    lease
}

/// One attempt to take or renew the Lease; `Ok(true)` when `me` holds it after.
pub async fn try_acquire(api: &Api<Lease>, name: &str, me: &str) -> kube::Result<bool> {
    let now = Timestamp::now();
    match api.get_opt(name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec::default()),
            };
            match api
                .create(&PostParams::default(), &taken(lease, me, now))
                .await
            {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        Some(lease) if can_take(&lease, me, now) => {
            // The resourceVersion in the object makes this a compare-and-swap.
            match api
                .replace(name, &PostParams::default(), &taken(lease, me, now))
                .await
            {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        Some(_) => Ok(false),
    }
}

/// Waits until `me` holds the Lease, then keeps renewing it in the background; if a
/// renewal does not succeed within the Lease duration, the process exits.
pub async fn lead(client: Client, namespace: &str, name: &str, me: &str) {
    let api: Api<Lease> = Api::namespaced(client, namespace);
    tracing::info!(lease = %format!("{namespace}/{name}"), identity = me, "waiting for leadership");
    loop {
        match try_acquire(&api, name, me).await {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "leader election: cannot read or write the Lease"),
        }
        tokio::time::sleep(RETRY).await;
    }
    tracing::info!(identity = me, "leading");
    let (name, me) = (name.to_string(), me.to_string());
    tokio::spawn(async move {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(RENEW).await;
            match try_acquire(&api, &name, &me).await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!("leadership lost to another replica; exiting");
                    std::process::exit(1);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "leader election: renewal failed");
                    if last_ok.elapsed() > Duration::from_secs(LEASE_SECONDS as u64) - RENEW {
                        tracing::error!("could not renew the Lease in time; exiting");
                        std::process::exit(1);
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, renewed: Option<i64>) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                lease_duration_seconds: Some(LEASE_SECONDS),
                renew_time: renewed.map(|s| MicroTime(Timestamp::from_second(s).unwrap())),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn who_may_take_the_lease() {
        let now = Timestamp::from_second(1_000).unwrap();
        assert!(can_take(&lease(None, None), "a", now));
        assert!(can_take(&lease(Some("a"), Some(999)), "a", now));
        assert!(!can_take(&lease(Some("b"), Some(999)), "a", now));
        assert!(!can_take(&lease(Some("b"), Some(1_000 - 15)), "a", now));
        assert!(can_take(&lease(Some("b"), Some(1_000 - 16)), "a", now));
        let t = taken(lease(Some("b"), Some(1)), "a", now);
        let spec = t.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.lease_transitions, Some(1));
        let again = taken(
            Lease {
                metadata: ObjectMeta::default(),
                spec: Some(spec),
            },
            "a",
            now,
        );
        assert_eq!(
            again.spec.unwrap().lease_transitions,
            Some(1),
            "a renewal is no transition"
        );
    }
}
