//! Submits straight into a store (no HTTP): many functions at once, for comparing one
//! Redis with a cluster, for the cost of `--store-replicas`, and for the embedded
//! store's group commit (`URL` = `embedded:DIR`: a redb file per function under `DIR`,
//! every submit acknowledged after the fsync'd commit that holds it, as in the sidecar).
//!
//! `cargo run --release -p fal-sidecar --example store_bench -- URL FUNCTIONS SECONDS CONCURRENCY [REPLICAS]`
//! prints one line: `submits_per_s p50_ms p99_ms errors`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fal_sidecar::job::new_id;
use fal_sidecar::store::embedded::EmbeddedStore;
use fal_sidecar::store::redis::{Durability, RedisHub, Subscribe};
use fal_sidecar::store::Store;

mod common;
use common::spec;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: store_bench URL FUNCTIONS SECONDS CONCURRENCY [REPLICAS]");
        std::process::exit(2);
    }
    let url = &args[1];
    let functions: usize = args[2].parse().expect("FUNCTIONS");
    let seconds: u64 = args[3].parse().expect("SECONDS");
    let concurrency: usize = args[4].parse().expect("CONCURRENCY");
    let replicas: u32 = args.get(5).map_or(0, |r| r.parse().expect("REPLICAS"));
    let stores: Vec<Arc<dyn Store>> = if let Some(dir) = url.strip_prefix("embedded:") {
        (0..functions)
            .map(|i| {
                let dir = std::path::Path::new(dir).join(format!("f{i}"));
                EmbeddedStore::open(&dir, 3).expect("open the embedded store") as Arc<dyn Store>
            })
            .collect()
    } else {
        let durability = Durability {
            replicas,
            timeout: Duration::from_millis(2000),
        };
        let hub =
            RedisHub::connect_with(url, Subscribe::One("fal:{bench/none}:".into()), durability)
                .expect("connect");
        hub.ping().await.expect("ping");
        let run = new_id();
        (0..functions)
            .map(|i| hub.store(&format!("bench-{run}/f{i}"), 3) as Arc<dyn Store>)
            .collect()
    };
    let body = Bytes::from_static(br#"{"prompt": "a cat"}"#);
    let end = Instant::now() + Duration::from_secs(seconds);
    let errors = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let store = stores[t % functions].clone();
            let body = body.clone();
            let errors = errors.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < end {
                    let t0 = Instant::now();
                    match store.submit(spec(), body.clone(), usize::MAX).await {
                        Ok(_) => lat.push(t0.elapsed()),
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "{:.0} {:.3} {:.3} {}",
        all.len() as f64 / seconds as f64,
        pct(0.5),
        pct(0.99),
        errors.load(Ordering::Relaxed)
    );
}
