//! The gateway in a cluster: functions from FalFunction watch events, ready replicas
//! from the EndpointSlices of each function's Service (the sidecar's `http` port of
//! every ready pod). Calls go straight to pod addresses: no kube-proxy hop, and no
//! need for routable Service IPs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};

use super::Gateway;
use crate::crd::FalFunction;
use crate::falkey::FalKey;
use crate::function::{FunctionInfo, FunctionSink};
use crate::labels::{FUNCTION_LABEL, MANAGED_SELECTOR};
use crate::sidecar::HTTP_PORT_NAME;

/// Keeps a sink's functions (the gateway's, the autoscaler's) in step with the
/// cluster's FalFunctions.
pub async fn watch_functions(client: Client, gw: Arc<dyn FunctionSink>) {
    let api: Api<FalFunction> = Api::all(client);
    let mut seen: HashSet<String> = HashSet::new();
    let mut init: HashSet<String> = HashSet::new();
    let mut events = watcher::watcher(api, watcher::Config::default()).boxed();
    while let Some(ev) = events.next().await {
        match ev {
            Ok(Event::Apply(ff)) | Ok(Event::InitApply(ff)) => {
                match FunctionInfo::from_object(&ff) {
                    Ok(info) => {
                        init.insert(info.key());
                        seen.insert(info.key());
                        gw.upsert(info);
                    }
                    Err(e) => {
                        tracing::warn!(name = %ff.name_any(), error = %e, "gateway: ignoring a FalFunction")
                    }
                }
            }
            Ok(Event::Delete(ff)) => {
                let key = format!("{}/{}", ff.namespace().unwrap_or_default(), ff.name_any());
                seen.remove(&key);
                gw.remove(&key);
            }
            Ok(Event::Init) => init.clear(),
            Ok(Event::InitDone) => {
                // A relist: what was not listed is gone.
                for gone in seen.difference(&init).cloned().collect::<Vec<_>>() {
                    gw.remove(&gone);
                }
                seen = init.clone();
                gw.synced();
            }
            Err(e) => {
                tracing::warn!(error = %e, "gateway: watching FalFunctions failed; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}

/// Keeps the gateway's key ring in step with the cluster's FalKeys: a created, changed,
/// disabled or deleted key takes effect as soon as its watch event arrives. A FalKey
/// the gateway cannot read (a bad spec the CRD's rules let through) is left out of the
/// ring, so its key is refused.
pub async fn watch_keys(client: Client, gw: Arc<Gateway>) {
    let api: Api<FalKey> = Api::all(client);
    let ring = gw.auth.ring().clone();
    let mut staged = Vec::new();
    let record = |fk: &FalKey| match fk.record() {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(falkey = %format!("{}/{}", fk.namespace().unwrap_or_default(), fk.name_any()), error = %e, "gateway: ignoring a FalKey (its key is refused)");
            None
        }
    };
    let mut events = watcher::watcher(api, watcher::Config::default()).boxed();
    while let Some(ev) = events.next().await {
        match ev {
            Ok(Event::Apply(fk)) => match record(&fk) {
                Some(r) => ring.upsert(r),
                None => ring.remove(&fk.namespace().unwrap_or_default(), &fk.name_any()),
            },
            Ok(Event::Delete(fk)) => {
                ring.remove(&fk.namespace().unwrap_or_default(), &fk.name_any())
            }
            Ok(Event::Init) => staged.clear(),
            Ok(Event::InitApply(fk)) => staged.extend(record(&fk)),
            Ok(Event::InitDone) => {
                ring.replace_all(std::mem::take(&mut staged));
                fal_sidecar::runtime::release_freed_memory();
                if !gw
                    .keys_synced
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::info!(keys = ring.len(), "gateway: FalKeys loaded");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "gateway: watching FalKeys failed; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}

/// Ready sidecar addresses of one EndpointSlice: `(pod, ip:port)`.
pub fn ready_endpoints(slice: &EndpointSlice) -> Vec<(String, String)> {
    let Some(port) = slice
        .ports
        .as_ref()
        .and_then(|ps| {
            ps.iter()
                .find(|p| p.name.as_deref() == Some(HTTP_PORT_NAME))
        })
        .and_then(|p| p.port)
    else {
        return Vec::new();
    };
    slice
        .endpoints
        .iter()
        .filter(|e| {
            let c = e.conditions.as_ref();
            // Ready unset means ready (the API's own rule); terminating pods are out.
            c.and_then(|c| c.ready).unwrap_or(true)
                && !c.and_then(|c| c.terminating).unwrap_or(false)
        })
        .filter_map(|e| {
            let ip = e.addresses.first()?;
            let host = if ip.contains(':') {
                format!("[{ip}]")
            } else {
                ip.clone()
            };
            let id = e
                .target_ref
                .as_ref()
                .and_then(|t| t.name.clone())
                .unwrap_or_else(|| ip.clone());
            Some((id, format!("{host}:{port}")))
        })
        .collect()
}

/// The function (`namespace/name`) a slice belongs to.
fn slice_function(slice: &EndpointSlice) -> Option<String> {
    let labels = slice.metadata.labels.as_ref()?;
    let name = labels
        .get(FUNCTION_LABEL)
        .or_else(|| labels.get("kubernetes.io/service-name"))?;
    Some(format!("{}/{}", slice.namespace()?, name))
}

/// Ready endpoints `(pod, ip:port)` of a function, by EndpointSlice uid.
type Slices = HashMap<String, (String, Vec<(String, String)>)>;

/// Keeps every function's ready replicas in step with its EndpointSlices.
pub async fn watch_endpoints(client: Client, gw: Arc<Gateway>) {
    let api: Api<EndpointSlice> = Api::all(client);
    let cfg = watcher::Config::default().labels(MANAGED_SELECTOR);
    // slice uid → (function, endpoints)
    let mut slices: Slices = HashMap::new();
    let mut staged: Slices = HashMap::new();
    let mut events = watcher::watcher(api, cfg).boxed();
    let publish = |slices: &Slices, keys: &[String]| {
        let mut by_fn: BTreeMap<&str, Vec<(String, String)>> = BTreeMap::new();
        for (f, eps) in slices.values() {
            by_fn
                .entry(f.as_str())
                .or_default()
                .extend(eps.iter().cloned());
        }
        for k in keys {
            gw.set_replicas(k, by_fn.get(k.as_str()).cloned().unwrap_or_default());
        }
    };
    while let Some(ev) = events.next().await {
        match ev {
            Ok(Event::Apply(s)) => {
                let (Some(f), Some(uid)) = (slice_function(&s), s.uid()) else {
                    continue;
                };
                slices.insert(uid, (f.clone(), ready_endpoints(&s)));
                publish(&slices, &[f]);
            }
            Ok(Event::Delete(s)) => {
                let (Some(f), Some(uid)) = (slice_function(&s), s.uid()) else {
                    continue;
                };
                slices.remove(&uid);
                publish(&slices, &[f]);
            }
            Ok(Event::Init) => staged.clear(),
            Ok(Event::InitApply(s)) => {
                if let (Some(f), Some(uid)) = (slice_function(&s), s.uid()) {
                    staged.insert(uid, (f, ready_endpoints(&s)));
                }
            }
            Ok(Event::InitDone) => {
                let mut keys: Vec<String> = slices.values().map(|(f, _)| f.clone()).collect();
                slices = std::mem::take(&mut staged);
                keys.extend(slices.values().map(|(f, _)| f.clone()));
                keys.sort();
                keys.dedup();
                publish(&slices, &keys);
            }
            Err(e) => {
                tracing::warn!(error = %e, "gateway: watching EndpointSlices failed; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_endpoints_take_the_sidecar_port_of_ready_pods() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": "app-x", "namespace": "ns",
                         "labels": {"kubernetes.io/service-name": "app"}},
            "addressType": "IPv4",
            "ports": [{"name": "queue", "port": 9081}, {"name": "http", "port": 9080}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "app-1"}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false}, "targetRef": {"kind": "Pod", "name": "app-2"}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": true, "terminating": true}},
                {"addresses": ["10.0.0.4"]}
            ]
        }))
        .unwrap();
        assert_eq!(
            ready_endpoints(&slice),
            vec![
                ("app-1".to_string(), "10.0.0.1:9080".to_string()),
                ("10.0.0.4".to_string(), "10.0.0.4:9080".to_string())
            ]
        );
        assert_eq!(slice_function(&slice).as_deref(), Some("ns/app"));
    }
}
