//! Group WAIT: with `--store-replicas N`, durable writes that arrive while `WAIT`s are
//! out go together in the next pipeline, `EVALSHA … EVALSHA … WAIT N`, on one
//! connection. A `WAIT` counts the replicas that have every write its connection made
//! before it, so one answer acknowledges the whole group (the group commit of a
//! database's log, with the replicas as the disk).
//!
//! One writer task per WAIT connection, each with its connection to itself (a `WAIT`
//! blocks its connection: a write queued behind another writer's `WAIT` would wait a
//! round trip for nothing). An idle writer takes what is queued at once, so a lone
//! write costs what it did before; under load each round trip acknowledges every
//! write that queued during the previous one. Before, every write sent a `WAIT` of its
//! own and held one of the 8 connections for a replica round trip.
//!
//! In a cluster a group holds the writes of one function only: one function's keys
//! live in one slot, so a group goes to one node (the pipeline the cluster client
//! routes), and a group's `WAIT` on that node counts replicas of that node. With one
//! primary (a single Redis, Sentinel) every write goes to the same node, so a group
//! takes the queued writes of every function: the replication offset is the node's,
//! and a `WAIT` after them covers them all.
//!
//! Nothing changes for a caller: its write is acknowledged only once N replicas
//! confirmed it; a group that gets fewer, a lost connection or a timeout fails every
//! write in it with `Unavailable`; a script error fails that write alone. A write whose
//! script the node had not cached is handed back ([`Outcome::NoScript`]: nothing ran)
//! and the caller sends the source itself.

use redis::Value;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use tokio::sync::{oneshot, Notify};

use super::RedisHub;
use crate::store::{StoreError, StoreResult};

/// Most writes in one pipeline.
const MAX_GROUP: usize = 256;

/// What became of one write.
pub(super) enum Outcome {
    Done(StoreResult<Value>),
    /// The node did not know the script's hash: nothing ran.
    NoScript,
}

struct Pending {
    /// The function's key prefix: in a cluster, a group holds one function's writes.
    prefix: Arc<str>,
    cmd: redis::Cmd,
    reply: oneshot::Sender<Outcome>,
}

#[derive(Default)]
struct Queue {
    pending: Mutex<VecDeque<Pending>>,
    more: Notify,
    /// A cluster: a group holds one function's writes (one slot, one node).
    per_function: bool,
}

impl Queue {
    /// The oldest write and every other queued write that can go with it (in order): of
    /// its function in a cluster, of any function with one primary.
    fn take_group(&self) -> Vec<Pending> {
        let mut q = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let Some(first) = q.pop_front() else {
            return Vec::new();
        };
        let mut group = vec![first];
        let mut i = 0;
        while i < q.len() && group.len() < MAX_GROUP {
            if !self.per_function || q[i].prefix == group[0].prefix {
                group.extend(q.remove(i));
            } else {
                i += 1;
            }
        }
        if !q.is_empty() {
            self.more.notify_one(); // another writer can take the rest
        }
        group
    }
}

/// The writers of a hub's durable writes (see the module docs); they stop when this
/// is dropped, failing what they held.
pub(super) struct GroupWait {
    queue: Arc<Queue>,
    writers: Vec<tokio::task::AbortHandle>,
}

impl Drop for GroupWait {
    fn drop(&mut self) {
        self.writers.iter().for_each(|w| w.abort());
    }
}

impl GroupWait {
    /// One writer per WAIT connection of `hub`, on the runtime that made the hub (the
    /// process's own, not a caller's: an HTTP thread's runtime ends before the hub).
    pub(super) fn start(hub: &Arc<RedisHub>) -> GroupWait {
        let queue = Arc::new(Queue {
            per_function: hub.cluster,
            ..Queue::default()
        });
        let writers = (0..hub.wait_pool.len().max(1))
            .map(|i| {
                let task = write_groups(Arc::downgrade(hub), queue.clone(), i);
                hub.runtime.spawn(task).abort_handle()
            })
            .collect();
        GroupWait { queue, writers }
    }

    /// Sends `cmd` (a script invocation for the function of `prefix`) in a group and
    /// waits for its answer.
    pub(super) async fn run(&self, prefix: Arc<str>, cmd: redis::Cmd) -> Outcome {
        let (reply, answer) = oneshot::channel();
        self.queue
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(Pending { prefix, cmd, reply });
        self.queue.more.notify_one();
        answer.await.unwrap_or_else(|_| {
            Outcome::Done(Err(StoreError::Unavailable(
                "the store's writer stopped (shutting down)".into(),
            )))
        })
    }
}

async fn write_groups(hub: Weak<RedisHub>, queue: Arc<Queue>, conn: usize) {
    loop {
        let mut group = queue.take_group();
        if group.is_empty() {
            queue.more.notified().await;
            continue;
        }
        let Some(hub) = hub.upgrade() else { return };
        write_group(&hub, conn, &mut group).await;
    }
}

async fn write_group(hub: &RedisHub, conn: usize, group: &mut Vec<Pending>) {
    let (replicas, timeout) = (hub.durability.replicas, hub.durability.timeout);
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for p in group.iter() {
        pipe.add_command(p.cmd.clone());
    }
    pipe.cmd("WAIT")
        .arg(replicas)
        .arg(timeout.as_millis() as u64);
    let pipe = &pipe;
    let connection = hub.wait_pool.get(conn).unwrap_or(&hub.conn);
    let reply = hub
        .guard_on(connection, |mut c| async move {
            pipe.query_async::<Vec<Value>>(&mut c).await
        })
        .await;
    let mut values = match reply {
        Ok(v) if v.len() == group.len() + 1 => v,
        Ok(v) => {
            let n = v.len();
            let e = format!("{n} answers to a pipeline of {}", group.len() + 1);
            return fail(group, &hub.unavailable(e));
        }
        Err(e) => return fail(group, &e),
    };
    let confirmed = match values.pop() {
        Some(Value::Int(n)) => n,
        _ => -1,
    };
    let short = (confirmed < i64::from(replicas)).then(|| {
        format!(
            "only {confirmed} of {replicas} redis replicas confirmed the write within \
             {timeout:?} (--store-replicas); it is not acknowledged (a retry with the same \
             Idempotency-Key cannot run it twice)"
        )
    });
    for (p, v) in group.drain(..).zip(values) {
        let outcome = match (v, &short) {
            (Value::ServerError(e), _) if e.code() == "NOSCRIPT" => Outcome::NoScript,
            (Value::ServerError(e), _) => {
                Outcome::Done(Err(hub.unavailable(redis::RedisError::from(e))))
            }
            (_, Some(why)) => Outcome::Done(Err(StoreError::Unavailable(why.clone()))),
            (v, None) => Outcome::Done(Ok(v)),
        };
        let _ = p.reply.send(outcome);
    }
}

fn fail(group: &mut Vec<Pending>, e: &StoreError) {
    let why = match e {
        StoreError::Unavailable(why) => why.clone(),
        other => other.to_string(),
    };
    for p in group.drain(..) {
        let _ = p
            .reply
            .send(Outcome::Done(Err(StoreError::Unavailable(why.clone()))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(per_function: bool, prefixes: &[&str]) -> (Queue, Vec<oneshot::Receiver<Outcome>>) {
        let q = Queue {
            per_function,
            ..Queue::default()
        };
        let mut answers = Vec::new();
        for (i, p) in prefixes.iter().enumerate() {
            let (reply, answer) = oneshot::channel();
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(i);
            q.pending.lock().unwrap().push_back(Pending {
                prefix: Arc::from(*p),
                cmd,
                reply,
            });
            answers.push(answer);
        }
        (q, answers)
    }

    fn order(group: &[Pending]) -> Vec<String> {
        group
            .iter()
            .map(|p| String::from_utf8_lossy(&p.cmd.get_packed_command()).into_owned())
            .map(|packed| packed.rsplit("\r\n").nth(1).unwrap_or_default().to_string())
            .collect()
    }

    #[test]
    fn with_one_primary_a_group_takes_every_function_s_writes_in_order() {
        let (q, _answers) = queue(false, &["a", "b", "a", "c"]);
        assert_eq!(order(&q.take_group()), ["0", "1", "2", "3"]);
        assert!(q.take_group().is_empty());
    }

    #[test]
    fn in_a_cluster_a_group_holds_one_function_s_writes() {
        let (q, _answers) = queue(true, &["a", "b", "a", "c"]);
        assert_eq!(order(&q.take_group()), ["0", "2"]);
        assert_eq!(order(&q.take_group()), ["1"]);
        assert_eq!(order(&q.take_group()), ["3"]);
    }

    #[test]
    fn a_group_stops_at_its_size_limit() {
        let prefixes = vec!["a"; MAX_GROUP + 3];
        let (q, _answers) = queue(false, &prefixes);
        assert_eq!(q.take_group().len(), MAX_GROUP);
        assert_eq!(q.take_group().len(), 3);
    }
}
