//! What any client could get out of a primary and its replica, with and without
//! `WAIT 1` after its writes: the bound for `--store-replicas 1` on this machine.
//!
//! `CONNS` connections each send, in a loop, a pipeline of `GROUP` runs of the store's
//! own submit script (the same source, keys and arguments as the sidecar's) and, with
//! `WAIT_REPLICAS` > 0, a `WAIT WAIT_REPLICAS 2000` after them; so `CONNS × GROUP`
//! submits are always out, and every one is acknowledged together with its group, the
//! way `store/redis/group_wait.rs` acknowledges them, but with no queue, no writer tasks
//! and no store in between. Run it for several shapes at the same `CONNS × GROUP`: the
//! best ratio of `WAIT_REPLICAS` 1 to 0 over the shapes is what grouping can reach.
//!
//! `cargo run --release -p fal-sidecar --example wait_bound -- URL SECONDS CONNS GROUP [WAIT_REPLICAS]`
//! prints one line: `submits_per_s p50_ms errors` (p50 of a submit = of its pipeline).

use std::time::{Duration, Instant};

use fal_sidecar::job::{new_id, now_ms};

mod common;
use common::spec;

const PRELUDE: &str = include_str!("../src/store/redis/lua/prelude.lua");
const SUBMIT: &str = include_str!("../src/store/redis/lua/submit.lua");
const FUNCTIONS: usize = 16;

/// One run of the submit script, as `RedisStore::submit` sends it.
fn submit(pipe: &mut redis::Pipeline, sha: &str, prefix: &str) {
    let spec = spec();
    let json = serde_json::to_vec(&spec).expect("serialize job spec");
    let cmd = pipe.cmd("EVALSHA").arg(sha).arg(5);
    for k in ["queue", "deadlines", "seq", "activity"] {
        cmd.arg(format!("{prefix}{k}"));
    }
    cmd.arg(format!("{prefix}job:{}", spec.id))
        .arg(prefix)
        .arg(&spec.id)
        .arg(json)
        .arg(&br#"{"prompt": "a cat"}"#[..])
        .arg(spec.priority.index().to_string())
        .arg("")
        .arg(usize::MAX.to_string())
        .arg(spec.submitted_at_ms.to_string())
        .arg("")
        .arg(&spec.owner)
        .arg(now_ms().to_string())
        .arg("")
        .arg("");
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: wait_bound URL SECONDS CONNS GROUP [WAIT_REPLICAS]");
        std::process::exit(2);
    }
    let client = redis::Client::open(args[1].as_str()).expect("URL");
    let seconds: u64 = args[2].parse().expect("SECONDS");
    let conns: usize = args[3].parse().expect("CONNS");
    let group: usize = args[4].parse().expect("GROUP");
    let replicas: u32 = args.get(5).map_or(0, |r| r.parse().expect("WAIT_REPLICAS"));
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(format!("{PRELUDE}{SUBMIT}"))
        .query_async(&mut c)
        .await
        .expect("SCRIPT LOAD");
    let run = new_id();
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for t in 0..conns {
        let client = client.clone();
        let sha = sha.clone();
        let prefixes: Vec<String> = (0..group)
            .map(|i| format!("fal:{{bench-{run}/f{}}}:", (t * group + i) % FUNCTIONS))
            .collect();
        tasks.push(tokio::spawn(async move {
            // The store's bound on an answer (`redis_conn.rs`): the crate's default
            // (500 ms) is shorter than a `WAIT` may take.
            let config =
                redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(3)));
            let mut c = client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .expect("connect");
            let (mut lat, mut errors) = (Vec::new(), 0u64);
            while Instant::now() < end {
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                for p in &prefixes {
                    submit(&mut pipe, &sha, p);
                }
                if replicas > 0 {
                    pipe.cmd("WAIT").arg(replicas).arg(2000);
                }
                let t0 = Instant::now();
                match pipe.query_async::<Vec<redis::Value>>(&mut c).await {
                    Ok(v) => {
                        let failed = v[..group]
                            .iter()
                            .filter(|v| matches!(v, redis::Value::ServerError(_)))
                            .count();
                        let short = replicas > 0
                            && !matches!(v.get(group), Some(redis::Value::Int(n)) if *n >= i64::from(replicas));
                        if let Some(e) = v.iter().find(|v| matches!(v, redis::Value::ServerError(_))) {
                            eprintln!("a submit failed: {e:?}");
                        }
                        if short {
                            eprintln!("WAIT answered {:?}", v.get(group));
                            errors += group as u64;
                        } else {
                            errors += failed as u64;
                            lat.extend(std::iter::repeat_n(t0.elapsed(), group - failed));
                        }
                    }
                    Err(e) => {
                        eprintln!("a pipeline failed after {:?}: {e}", t0.elapsed());
                        errors += group as u64
                    }
                }
            }
            (lat, errors)
        }));
    }
    let (mut all, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (lat, e) = t.await.expect("task");
        all.extend(lat);
        errors += e;
    }
    all.sort();
    let p50 = all
        .get(all.len() / 2)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    println!(
        "{:.0} {:.3} {}",
        all.len() as f64 / seconds as f64,
        p50,
        errors
    );
}
