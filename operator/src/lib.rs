//! fal-operator: the Kubernetes side of self-hosted fal-serverless.
//!
//! Where things live:
//! - [`crd`]: the `FalFunction` resource; [`catalog`]: machine types;
//! - [`falkey`]: the `FalKey` resource (API keys); [`keycmd`]: `fal-operator key`;
//! - [`deployment`], [`sidecar`], [`service`], [`networkpolicy`]: a FalFunction becomes
//!   objects (pure);
//! - [`environment`]: a served file's build Job, environments claim and runner pods
//!   (pure);
//! - [`status`], [`conditions`]: what its status should say (pure);
//! - [`render`]: the same objects from a manifest, without a cluster;
//! - [`controller`]: the thin reconcile loop around all of the above;
//! - [`metrics`]: `/metrics` and `/healthz`;
//! - [`autoscale`]: load → replicas (the pure decision in `autoscale::decide`);
//! - [`gateway`]: the always-on entry point (queue API, held sync calls, wake-ups);
//! - [`local`]: replicas as local processes (`fal-operator local`);
//! - [`deploy`]: `function serve`, the seed's deploy flow (a decorated Python file).

pub mod autoscale;
pub mod catalog;
pub mod conditions;
pub mod config;
pub mod controller;
pub mod crd;
pub mod deploy;
pub mod deployment;
pub mod diff;
pub mod environment;
mod error;
pub mod falkey;
pub mod function;
pub mod gateway;
pub mod keycmd;
pub mod labels;
pub mod leader;
pub mod local;
pub mod metrics;
#[cfg(test)]
mod mock_api;
pub mod networkpolicy;
pub mod render;
pub mod serve;
pub mod service;
pub mod sidecar;
pub mod status;
pub mod validate;

pub use error::{error_chain, Error, Result};
