//! The NetworkPolicy of a FalFunction: its pods admit calls only from the gateway.
//!
//! The gateway checks API keys, function auth modes and rate limits; the sidecar's run
//! port would serve anyone who reaches it, so only gateway pods may. The app's own port
//! (`exposedPort`) and the sidecar's queue-host port admit nothing: every request goes
//! through the gateway and the sidecar. The metrics port admits a configured metrics
//! namespace (Prometheus). Enforced where the cluster's CNI implements NetworkPolicy.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::config::NetworkPolicyConfig;
use crate::crd::FalFunction;
use crate::labels::{identity, owned_meta, selector};
use crate::sidecar::{SIDECAR_ADMIN_PORT, SIDECAR_HTTP_PORT};
use crate::Result;

/// Label every namespace carries with its own name (set by the apiserver since 1.22).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

fn namespace(name: &str) -> LabelSelector {
    LabelSelector {
        match_labels: Some(BTreeMap::from([(
            NAMESPACE_NAME_LABEL.to_string(),
            name.to_string(),
        )])),
        match_expressions: None,
    }
}

/// One TCP port, by number: a port name would also open an app container port that
/// happens to carry the same name.
fn tcp(port: i32) -> Vec<NetworkPolicyPort> {
    vec![NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".to_string()),
        end_port: None,
    }]
}

impl FalFunction {
    /// The NetworkPolicy named after the function, owned by it.
    pub fn network_policy(&self, cfg: &NetworkPolicyConfig) -> Result<NetworkPolicy> {
        let (_, name) = identity(self)?;
        let mut ingress = vec![NetworkPolicyIngressRule {
            // One peer holding both selectors: gateway pods *in* the gateway namespace
            // (two peers would admit any pod of that namespace, or gateway-looking pods
            // of any namespace).
            from: Some(vec![NetworkPolicyPeer {
                namespace_selector: Some(namespace(&cfg.gateway_namespace)),
                pod_selector: Some(LabelSelector {
                    match_labels: Some(cfg.gateway_pod_labels.clone()),
                    match_expressions: None,
                }),
                ip_block: None,
            }]),
            ports: Some(tcp(SIDECAR_HTTP_PORT)),
        }];
        // Without a metrics namespace there is no rule for the admin port: the kubelet's
        // probes of /healthz and /readyz come from the node, which common CNIs (Calico,
        // Cilium, the kubenet-based ones) never subject to NetworkPolicy.
        if let Some(metrics) = &cfg.metrics_namespace {
            ingress.push(NetworkPolicyIngressRule {
                from: Some(vec![NetworkPolicyPeer {
                    namespace_selector: Some(namespace(metrics)),
                    pod_selector: None,
                    ip_block: None,
                }]),
                ports: Some(tcp(SIDECAR_ADMIN_PORT)),
            });
        }
        Ok(NetworkPolicy {
            metadata: owned_meta(self)?,
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(LabelSelector {
                    match_labels: Some(selector(&name)),
                    match_expressions: None,
                }),
                policy_types: Some(vec!["Ingress".to_string()]),
                ingress: Some(ingress),
                egress: None,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::FalFunctionSpec;
    use crate::labels::labels;
    use crate::sidecar::SIDECAR_QUEUE_PORT;
    use serde_json::json;

    fn ff() -> FalFunction {
        let mut ff = FalFunction::new("app", FalFunctionSpec::with_image("a:1"));
        ff.metadata.namespace = Some("team-a".into());
        ff.metadata.uid = Some("u".into());
        ff
    }

    fn cfg(metrics: Option<&str>) -> NetworkPolicyConfig {
        NetworkPolicyConfig {
            gateway_namespace: "fal-system".into(),
            gateway_pod_labels: BTreeMap::from([
                ("app.kubernetes.io/component".into(), "gateway".into()),
                ("app.kubernetes.io/instance".into(), "fal".into()),
            ]),
            metrics_namespace: metrics.map(String::from),
        }
    }

    #[test]
    fn only_gateway_pods_of_the_gateway_namespace_reach_the_run_port() {
        let np = ff().network_policy(&cfg(None)).unwrap();
        assert_eq!(np.metadata.name.as_deref(), Some("app"));
        assert_eq!(np.metadata.namespace.as_deref(), Some("team-a"));
        assert_eq!(np.metadata.labels, Some(labels("app")));
        let owner = &np.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.uid.as_str(), owner.controller), ("u", Some(true)));
        let spec = serde_json::to_value(np.spec.unwrap()).unwrap();
        assert_eq!(
            spec,
            json!({
                "podSelector": {"matchLabels": {"fal.serverless.dev/function": "app"}},
                "policyTypes": ["Ingress"],
                "ingress": [{
                    "from": [{
                        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "fal-system"}},
                        "podSelector": {"matchLabels": {
                            "app.kubernetes.io/component": "gateway",
                            "app.kubernetes.io/instance": "fal"
                        }}
                    }],
                    "ports": [{"port": SIDECAR_HTTP_PORT, "protocol": "TCP"}]
                }]
            })
        );
    }

    #[test]
    fn metrics_namespace_reaches_only_the_admin_port() {
        let np = ff().network_policy(&cfg(Some("monitoring"))).unwrap();
        let ingress = np.spec.unwrap().ingress.unwrap();
        assert_eq!(ingress.len(), 2);
        let rule = serde_json::to_value(&ingress[1]).unwrap();
        assert_eq!(
            rule,
            json!({
                "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
                "ports": [{"port": SIDECAR_ADMIN_PORT, "protocol": "TCP"}]
            })
        );
    }

    #[test]
    fn app_and_queue_ports_stay_closed() {
        let mut spec = FalFunctionSpec::with_image("a:1");
        spec.exposed_port = 7860;
        let mut f = ff();
        f.spec = spec;
        let np = f.network_policy(&cfg(Some("monitoring"))).unwrap();
        let open: Vec<_> = np
            .spec
            .unwrap()
            .ingress
            .unwrap()
            .iter()
            .flat_map(|r| r.ports.clone().unwrap())
            .map(|p| p.port.unwrap())
            .collect();
        assert_eq!(
            open,
            [
                IntOrString::Int(SIDECAR_HTTP_PORT),
                IntOrString::Int(SIDECAR_ADMIN_PORT)
            ]
        );
        for closed in [7860, SIDECAR_QUEUE_PORT] {
            assert!(!open.contains(&IntOrString::Int(closed)));
        }
    }

    #[test]
    fn pod_selector_matches_the_deployment_pods() {
        let f = ff();
        let np = f.network_policy(&cfg(None)).unwrap();
        let d = f
            .deployment(
                &crate::catalog::MachineCatalog::builtin(),
                &crate::config::OperatorConfig::default(),
            )
            .unwrap();
        let pod_labels = d.spec.unwrap().template.metadata.unwrap().labels.unwrap();
        for (k, v) in np.spec.unwrap().pod_selector.unwrap().match_labels.unwrap() {
            assert_eq!(pod_labels.get(&k), Some(&v), "{k}");
        }
    }

    #[test]
    fn unnamespaced_functions_are_refused() {
        let f = FalFunction::new("app", FalFunctionSpec::with_image("a:1"));
        let err = f.network_policy(&cfg(None)).unwrap_err().to_string();
        assert!(err.starts_with("metadata.namespace"), "{err}");
    }
}
