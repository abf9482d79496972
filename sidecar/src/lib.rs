//! fal-sidecar: the fal queue, webhooks and direct calls in front of any HTTP app.
//!
//! Where things are:
//! - `auth` — who may call: API keys, auth modes, tenants, rate limits, tokens;
//! - `job` — the job model and state machine (pure);
//! - `store` — the `Store` trait, the embedded backend, the conformance suite;
//! - `api` — HTTP handlers: `queue` (generations A, B, C), `proxy` (direct calls), admin;
//! - `worker` — claims jobs, calls the app with retries, forwards cancels;
//! - `webhook` — payloads, Ed25519 signing, SSRF guard, the outbox delivery loop;
//! - `server` — accept loops with limits and graceful drain;
//! - `shutdown` — the stop flags every layer waits on (`wait_true`);
//! - `child`, `logs` — `run` mode: the app as a child process and its log lines;
//! - `config`, `runtime` — flags/env and the wiring `main` calls.

pub mod api;
pub mod auth;
pub mod child;
pub mod config;
pub mod edge;
pub mod job;
pub mod logs;
pub mod metrics;
pub mod runtime;
pub mod server;
pub mod shutdown;
pub mod slots;
pub mod store;
pub mod supervisor;
pub mod upstream;
pub mod webhook;
pub mod worker;
