//! The store against a real `redis-server` (and a 3-master Redis Cluster) started by the
//! tests, and the helpers that start them (`ready` and `rate_limit` use them too).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::store::MAX_LOG_LINES;
use super::*;
use crate::job::{now_ms, system_end, LogLine, StoredResult, SystemEnd};
use crate::store::{Store, StoreError};
use std::io::{Read, Write};
use std::sync::OnceLock;

/// A `redis-server` on a free port, in a temp dir, with `extra` arguments; it dies
/// with the test process (PR_SET_PDEATHSIG from a thread that never exits).
pub(crate) fn spawn_server(extra: &'static [&'static str]) -> u16 {
    spawn_server_with(extra.iter().map(|s| s.to_string()).collect())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn_server_with(extra: Vec<String>) -> u16 {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::os::unix::process::CommandExt;
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("fal-redis-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmd = std::process::Command::new(
            std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into()),
        );
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(&extra)
            .arg("--dir")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: prctl is async-signal-safe; nothing else runs before exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        // Lives as long as the test process (PR_SET_PDEATHSIG reaps it).
        #[allow(clippy::zombie_processes)]
        let _child = cmd.spawn().expect("start redis-server (is it installed?)");
        tx.send(port).unwrap();
        loop {
            std::thread::park();
        }
    });
    let port = rx.recv().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !matches!(ask(port, b"PING\r\n").as_deref(), Ok(r) if r.starts_with("+PONG")) {
        assert!(
            std::time::Instant::now() < deadline,
            "redis-server on port {port} did not answer PING"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    port
}

/// One inline command, the first reply read raw.
pub(crate) fn ask(port: u16, cmd: &[u8]) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(cmd)?;
    let mut buf = vec![0u8; 8192];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// One standalone server per test process.
pub(crate) fn server_port() -> u16 {
    static PORT: OnceLock<u16> = OnceLock::new();
    *PORT.get_or_init(|| spawn_server(&[]))
}

/// One 3-master Redis Cluster per test process (made with `redis-cli --cluster
/// create`): its `redis+cluster://` URL.
pub(crate) fn cluster_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let ports: Vec<u16> = (0..3)
            .map(|_| {
                // The bus port is explicit: the default (port + 10000) is past 65535
                // for high ports.
                let bus = free_port().to_string();
                spawn_server_with(
                    ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]
                        .into_iter()
                        .chain(["--cluster-port", bus.as_str()])
                        .map(String::from)
                        .collect(),
                )
            })
            .collect();
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(out.status.success(), "redis-cli --cluster create: {out:?}");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        for p in &ports {
            while !ask(*p, b"CLUSTER INFO\r\n").is_ok_and(|r| r.contains("cluster_state:ok")) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "cluster never became ok"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        format!("redis+cluster://{}", nodes.join(","))
    })
    .clone()
}

pub(crate) async fn test_store(max_attempts: u32) -> Arc<RedisStore> {
    let url = format!("redis://127.0.0.1:{}/0", server_port());
    let function = format!("test/{}", uuid::Uuid::new_v4());
    RedisStore::open(&url, &function, max_attempts)
        .await
        .unwrap()
}

#[test]
fn prefix_is_a_hash_tag() {
    assert_eq!(key_prefix("default/app"), "fal:{default/app}:");
}

#[tokio::test]
async fn unavailable_when_redis_is_down() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = RedisStore::open(&format!("redis://127.0.0.1:{port}/0"), "t/down", 3)
        .await
        .unwrap();
    let spec = crate::store::conformance::spec(crate::job::Priority::Normal);
    match store.submit(spec, Bytes::new(), 10).await {
        Err(StoreError::Unavailable(why)) => assert!(why.contains("redis"), "{why}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(matches!(
        store.status("x").await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        store.load().await,
        Err(StoreError::Unavailable(_))
    ));
}

#[tokio::test]
async fn positions_are_shared_between_replicas() {
    let url = format!("redis://127.0.0.1:{}/0", server_port());
    let function = format!("test/{}", uuid::Uuid::new_v4());
    let a = RedisStore::open(&url, &function, 3).await.unwrap();
    let b = RedisStore::open(&url, &function, 3).await.unwrap();
    let mut woken = b.changes();
    woken.borrow_and_update();
    let mut ids = Vec::new();
    for i in 0..5 {
        let s = crate::store::conformance::spec(crate::job::Priority::Normal);
        ids.push(s.id.clone());
        let pos = if i % 2 == 0 { &a } else { &b }
            .submit(s, Bytes::new(), 100)
            .await
            .unwrap();
        assert_eq!(pos.position, i);
    }
    tokio::time::timeout(Duration::from_secs(5), woken.changed())
        .await
        .unwrap()
        .unwrap();
    let c = b
        .claim("w", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.record.spec.id, ids[0]);
    assert_eq!(
        a.status(&ids[4]).await.unwrap().unwrap().queue_position,
        Some(3)
    );
    assert_eq!(a.load().await.unwrap().in_flight, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_hand_out_each_job_once() {
    let url = format!("redis://127.0.0.1:{}/0", server_port());
    let function = format!("test/{}", uuid::Uuid::new_v4());
    let a = RedisStore::open(&url, &function, 3).await.unwrap();
    let b = RedisStore::open(&url, &function, 3).await.unwrap();
    let mut ids = std::collections::HashSet::new();
    for _ in 0..200 {
        let s = crate::store::conformance::spec(crate::job::Priority::Normal);
        ids.insert(s.id.clone());
        a.submit(s, Bytes::new(), 1000).await.unwrap();
    }
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..8 {
        let s: Arc<RedisStore> = if n % 2 == 0 { a.clone() } else { b.clone() };
        tasks.spawn(async move {
            let mut got = Vec::new();
            while let Some(c) = s.claim("w", Duration::from_secs(30)).await.unwrap() {
                got.push(c.record.spec.id);
            }
            got
        });
    }
    let mut claimed = Vec::new();
    while let Some(r) = tasks.join_next().await {
        claimed.extend(r.unwrap());
    }
    assert_eq!(claimed.len(), 200, "each job handed out once");
    assert_eq!(
        claimed
            .into_iter()
            .collect::<std::collections::HashSet<_>>(),
        ids
    );
    assert_eq!(a.load().await.unwrap().in_flight, 200);
}

#[tokio::test]
async fn pending_webhooks_do_not_block_purges_and_logs_are_bounded() {
    let s = test_store(3).await;
    let mut hooked = crate::store::conformance::spec(crate::job::Priority::Normal);
    hooked.webhook_url = Some("http://127.0.0.1:9/hook".into());
    let plain = crate::store::conformance::spec(crate::job::Priority::Normal);
    for spec in [hooked.clone(), plain.clone()] {
        s.submit(spec, Bytes::new(), 10).await.unwrap();
        let c = s
            .claim("w", Duration::from_secs(30))
            .await
            .unwrap()
            .unwrap();
        let lines = (0..2100)
            .map(|i| LogLine::new(format!("l{i}"), "STDOUT"))
            .collect();
        s.append_logs(&c.record.spec.id, lines).await.unwrap();
        let st = s.status(&c.record.spec.id).await.unwrap().unwrap();
        assert_eq!(st.record.logs.len(), MAX_LOG_LINES);
        assert_eq!(st.record.logs.last().unwrap().message, "l2099");
        let (done, result) = system_end(SystemEnd::Cancelled, now_ms(), 1);
        assert!(s
            .complete(&c.record.spec.id, c.token, done, result)
            .await
            .unwrap());
    }
    let sweep = s
        .sweep(now_ms() + 10_000, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(sweep.purged, 1, "the job with a pending webhook stays");
    assert!(s.status(&hooked.id).await.unwrap().is_some());
    assert!(s.status(&plain.id).await.unwrap().is_none());
    s.delivery_attempted(&hooked.id, 1, None).await.unwrap();
    let sweep = s
        .sweep(now_ms() + 10_000, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(sweep.purged, 1);
    assert!(s.result(&hooked.id).await.unwrap().is_none());
}

crate::conformance_tests!(|_dir: std::path::PathBuf| async move {
    test_store(3).await as std::sync::Arc<dyn Store>
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_replicas_wait_for_a_replica_or_refuse() {
    let spec = crate::store::conformance::spec;
    let durable = |timeout_ms| Durability {
        replicas: 1,
        timeout: Duration::from_millis(timeout_ms),
    };
    // No replica: the write lands on the primary but is not acknowledged.
    let lonely = spawn_server(&[]);
    let url = format!("redis://127.0.0.1:{lonely}/0");
    let s = RedisStore::open_with(&url, "test/wait", 3, durable(200))
        .await
        .unwrap();
    let j = spec(crate::job::Priority::Normal);
    match s.submit(j.clone(), Bytes::new(), 10).await {
        Err(StoreError::Unavailable(why)) => {
            assert!(why.contains("0 of 1 redis replicas"), "{why}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    // A primary with one replica attached: acknowledged.
    let primary = spawn_server(&[]);
    let replica = spawn_server(&[]);
    ask(
        replica,
        format!("REPLICAOF 127.0.0.1 {primary}\r\n").as_bytes(),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !ask(primary, b"INFO replication\r\n").is_ok_and(|r| r.contains("state=online")) {
        assert!(
            std::time::Instant::now() < deadline,
            "the replica never attached"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = format!("redis://127.0.0.1:{primary}/0");
    let s = RedisStore::open_with(&url, "test/wait", 3, durable(2000))
        .await
        .unwrap();
    let j = spec(crate::job::Priority::Normal);
    let sub = s.submit(j.clone(), Bytes::new(), 10).await.unwrap();
    assert_eq!(sub.id, j.id);
    let c = s
        .claim("w", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    let result = StoredResult {
        status: 200,
        headers: vec![],
        body: Bytes::from_static(b"{}"),
    };
    let done = crate::job::app_end(200, now_ms(), 0.1);
    assert!(s.complete(&j.id, c.token, done, result).await.unwrap());
    // What the replica has is what was acknowledged.
    let on_replica = ask(
        replica,
        format!("HGET fal:{{test/wait}}:job:{} phase\r\n", j.id).as_bytes(),
    )
    .unwrap();
    assert!(on_replica.contains("\r\nc\r\n"), "{on_replica:?}");
}

/// The same suite on a 3-master Redis Cluster: every script routes by its declared
/// keys and runs on the node that owns the function's slot.
mod cluster {
    use super::*;

    pub(crate) async fn cluster_store(max_attempts: u32) -> Arc<RedisStore> {
        let function = format!("test/{}", uuid::Uuid::new_v4());
        RedisStore::open(&cluster_url(), &function, max_attempts)
            .await
            .unwrap()
    }

    crate::conformance_tests!(|_dir: std::path::PathBuf| async move {
        cluster_store(3).await as std::sync::Arc<dyn Store>
    });

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn functions_spread_over_shards_and_replicas_hear_each_other() {
        let url = cluster_url();
        for _ in 0..12 {
            let function = format!("spread/{}", uuid::Uuid::new_v4());
            let a = RedisStore::open(&url, &function, 3).await.unwrap();
            // A second replica of the function, with its own connections (its
            // subscription may sit on any node of the cluster).
            let b = RedisStore::open(&url, &function, 3).await.unwrap();
            let mut woken = b.changes();
            woken.borrow_and_update();
            let mut received = false;
            for _ in 0..50 {
                let spec = crate::store::conformance::spec(crate::job::Priority::Normal);
                a.submit(spec.clone(), Bytes::new(), 100).await.unwrap();
                assert!(b.status(&spec.id).await.unwrap().is_some());
                // The subscription connects in the background: submit until heard.
                if tokio::time::timeout(Duration::from_millis(100), woken.changed())
                    .await
                    .is_ok()
                {
                    received = true;
                    break;
                }
            }
            assert!(received, "replica b never heard a submit on a");
        }
        let ports: Vec<u16> = url
            .trim_start_matches("redis+cluster://")
            .split(',')
            .map(|h| h.rsplit(':').next().unwrap().parse().unwrap())
            .collect();
        let holding = ports
            .iter()
            .filter(|p| ask(**p, b"KEYS fal:{spread/*\r\n").is_ok_and(|r| !r.starts_with("*0")))
            .count();
        assert!(holding > 1, "12 functions all landed on one shard");
    }
}

/// Connected clients of the server at `port`, less the one asking.
fn clients(port: u16) -> usize {
    let info = ask(port, b"INFO clients\r\n").expect("INFO clients");
    let n: usize = info
        .lines()
        .find_map(|l| l.strip_prefix("connected_clients:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("connected_clients");
    n - 1
}

#[tokio::test]
async fn a_server_thread_sends_its_commands_on_a_connection_of_its_own() {
    let port = spawn_server(&[]);
    let url = format!("redis://127.0.0.1:{port}/0");
    let hub = RedisHub::connect(&url, Subscribe::One("fal:{test/own}:".into())).unwrap();
    let store = hub.store("test/own", 3);
    let spec = || crate::store::conformance::spec(crate::job::Priority::Normal);
    // Here (no server thread): the shared connection, and the subscription.
    store.submit(spec(), Bytes::new(), 100).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while clients(port) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the subscription never connected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(clients(port), 2);
    // The subscription is up and has renewed the threads' connections (none yet).
    while hub.epoch() == 0 {
        assert!(std::time::Instant::now() < deadline, "never subscribed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A server thread: its first command goes on the shared connection and starts the
    // thread's own, driven by its runtime; once that has answered, the thread's
    // commands go on it.
    let on_thread = store.clone();
    let thread = std::thread::spawn(move || {
        crate::server::set_thread_slot(0);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let s = || crate::store::conformance::spec(crate::job::Priority::Normal);
            let mut positions = vec![
                on_thread
                    .submit(s(), Bytes::new(), 100)
                    .await
                    .unwrap()
                    .position,
            ];
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while clients(port) < 3 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the thread's connection never came up"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Taken once it has answered its PING: then the newest connection is the one
            // that runs the thread's scripts.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while newest_client_last_command(port) != "evalsha" {
                let r = on_thread.submit(s(), Bytes::new(), 100).await.unwrap();
                positions.push(r.position);
                assert!(
                    std::time::Instant::now() < deadline,
                    "the thread never used its connection"
                );
            }
            for _ in 0..2 {
                positions.push(
                    on_thread
                        .submit(s(), Bytes::new(), 100)
                        .await
                        .unwrap()
                        .position,
                );
            }
            (positions, clients(port), newest_client_last_command(port))
        })
    });
    // Joined off this runtime: it drives the shared connection the thread starts on.
    let (positions, during, last_cmd) = tokio::task::spawn_blocking(move || thread.join().unwrap())
        .await
        .unwrap();
    let n = positions.len() as u64;
    assert_eq!(
        positions,
        (1..=n).collect::<Vec<_>>(),
        "the thread's submits queue behind the first"
    );
    assert_eq!(during, 3, "one more connection, for the server thread");
    assert_eq!(
        last_cmd, "evalsha",
        "the thread's submits go on its connection"
    );
    // Back here: still the shared connection.
    assert_eq!(
        store
            .submit(spec(), Bytes::new(), 100)
            .await
            .unwrap()
            .position,
        n + 1
    );
}

/// The last command of the most recently connected client (`CLIENT LIST`), other than
/// the connection asking.
fn newest_client_last_command(port: u16) -> String {
    let list = ask(port, b"CLIENT LIST\r\n").expect("CLIENT LIST");
    list.lines()
        .filter(|l| !l.contains("cmd=client|list"))
        .filter_map(|l| {
            let field = |k: &str| {
                l.split(' ')
                    .find_map(|f| f.strip_prefix(k))
                    .map(str::to_string)
            };
            Some((field("id=")?.parse::<u64>().ok()?, field("cmd=")?))
        })
        .max_by_key(|(id, _)| *id)
        .map(|(_, cmd)| cmd)
        .unwrap_or_default()
}

/// The webhook loop waits on `outbox_changes`: submits and claims (which queue no
/// webhook) leave it alone, a completion moves it here and on every other replica.
#[tokio::test]
async fn only_jobs_that_end_wake_the_webhook_loop() {
    let port = server_port();
    let url = format!("redis://127.0.0.1:{port}/0");
    let function = format!("test/{}", uuid::Uuid::new_v4());
    let a = RedisStore::open(&url, &function, 3).await.unwrap();
    let b = RedisStore::open(&url, &function, 3).await.unwrap();
    let (mut a_out, mut b_out) = (a.outbox_changes(), b.outbox_changes());
    // Both subscriptions are live, and each hub's bump on subscribing has happened.
    let numsub = format!(
        "*3\r\n$6\r\nPUBSUB\r\n$6\r\nNUMSUB\r\n${}\r\n{}events\r\n",
        key_prefix(&function).len() + 6,
        key_prefix(&function)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !ask(port, numsub.as_bytes()).is_ok_and(|r| r.ends_with(":2\r\n"))
        || *a_out.borrow() == 0
        || *b_out.borrow() == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "subscriptions never came up"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a_out.borrow_and_update();
    let b_before = *b_out.borrow_and_update();
    let mut claimed = Vec::new();
    for _ in 0..20 {
        let s = crate::store::conformance::spec(crate::job::Priority::Normal);
        a.submit(s, Bytes::new(), 100).await.unwrap();
        claimed.push(
            a.claim("w", Duration::from_secs(30))
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert!(
        !a_out.has_changed().unwrap(),
        "a submit or a claim woke the webhook loop"
    );
    let c = &claimed[0];
    let (done, result) = system_end(SystemEnd::Cancelled, now_ms(), 1);
    assert!(a
        .complete(&c.record.spec.id, c.token, done, result)
        .await
        .unwrap());
    assert!(
        a_out.has_changed().unwrap(),
        "a completion did not wake the webhook loop"
    );
    // The other replica hears it over pub/sub, after the submits and claims (one
    // connection delivers in order): the completion is the only move.
    tokio::time::timeout(Duration::from_secs(5), b_out.changed())
        .await
        .expect("the other replica never heard the completion")
        .unwrap();
    assert_eq!(*b_out.borrow(), b_before + 1);
}
