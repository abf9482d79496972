//! The Redis store: one queue per function, shared by every replica and the gateway.
//!
//! Every key of a function lives under `fal:{NAMESPACE/NAME}:` (the braces are a Redis
//! Cluster hash tag: one function's keys share a slot, so its Lua scripts stay legal).
//!
//! | key                      | type   | holds                                                   |
//! |--------------------------|--------|---------------------------------------------------------|
//! | `P seq`                  | string | INCR counter: submit order                              |
//! | `P token`                | string | INCR counter: fencing tokens                            |
//! | `P job:<id>`             | hash   | `spec` (JSON), `body`, `seq`, `prio`, `phase` (q/r/c), `attempts`, `token`, `lease`, `started`, `cancel`, `submitted`, `deadline`, `owner`, `webhook`, `idem`, `completion` (JSON), `result` (encoded) |
//! | `P logs:<id>`            | list   | log lines (JSON), the last 2000                         |
//! | `P queue`                | zset   | queued ids, score `prio * 2^50 + seq` (ZRANK = position) |
//! | `P deadlines`            | zset   | queued ids with a start deadline, score = deadline ms   |
//! | `P running`              | zset   | claimed ids, score = lease expiry (Redis clock, ms)     |
//! | `P completed`            | zset   | completed ids, score = completion ms (retention)        |
//! | `P outbox`               | zset   | pending webhooks, score = next attempt ms               |
//! | `P outbox_attempts`      | hash   | id → webhook attempts made                              |
//! | `P activity`             | string | last submit/claim/completion (ms)                       |
//! | `P idem:<key>`           | string | Idempotency-Key (hashed) → `fingerprint id position`; written by the submit script with the job, deleted with it |
//! | channel `P events`       | pubsub | "something changed": wakes workers and status streams   |
//! | channel `P cancel`       | pubsub | ids of running jobs whose cancel was requested          |
//!
//! Every state change is one Lua script (atomic, one round trip), one file a script in
//! `lua/` (its header: what it does, its KEYS and ARGV). Lease expiries are computed
//! from Redis' own clock (`TIME`), so replicas with skewed clocks agree. The results the
//! sidecar writes itself (start timeout, lost, cancelled) are built in Rust by
//! `job::system_end` before the script runs and passed in, so ending a job is as atomic
//! as completing it.
//!
//! Where things are: `hub` (the connection and subscription every function's store
//! shares), `store` (the [`Store`](crate::store::Store) of one function), `scripts` and
//! `lua/` (the scripts), `reply` (reading their replies), `ready` (the readiness probe),
//! `rate_limit` (the shared key rate limits); where it connects is `store::redis_conn`.

mod group_wait;
mod hub;
pub mod rate_limit;
pub mod ready;
mod reply;
mod scripts;
mod store;
#[cfg(test)]
mod tests;

pub use hub::{Activity, Durability, RedisHub, Subscribe};
pub use store::RedisStore;

/// The key prefix of a function's queue.
pub fn key_prefix(function: &str) -> String {
    format!("fal:{{{function}}}:")
}
