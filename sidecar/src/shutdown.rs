//! The shutdown flags: `watch::channel(false)` pairs that turn true once (stop
//! accepting, stop claiming, abandon a call, cut the WebSockets, quit). Every layer
//! waits on them, from the accept loops to the workers and the supervisor, so this
//! module imports none of them.

use tokio::sync::watch;

/// Resolves once the flag is true (and never holds a borrow across an await).
pub async fn wait_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await.map(|_| ());
}
