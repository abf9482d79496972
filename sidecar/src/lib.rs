//! fal-sidecar: the fal queue, webhooks and direct calls in front of any HTTP app.

pub mod job;
pub mod store;
