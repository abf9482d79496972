//! The Service in front of a FalFunction's sidecars: the gateway proxies direct calls
//! to `http` and queue calls to `queue`; `metrics` is there for a ServiceMonitor.
//! The app's own port is not exposed: every request goes through the sidecar.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::crd::FalFunction;
use crate::labels::{identity, selector};
use crate::sidecar::{HTTP_PORT_NAME, METRICS_PORT_NAME, QUEUE_PORT_NAME};
use crate::Result;

/// Service port of the run API (direct calls, `/fal/queue/*`).
pub const SERVICE_HTTP_PORT: i32 = 80;
/// Service port of the queue-host API.
pub const SERVICE_QUEUE_PORT: i32 = 8081;
/// Service port of the sidecar's `/metrics`.
pub const SERVICE_METRICS_PORT: i32 = 9090;

fn port(name: &str, number: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_string()),
        port: number,
        target_port: Some(IntOrString::String(name.to_string())),
        protocol: Some("TCP".to_string()),
        ..ServicePort::default()
    }
}

impl FalFunction {
    /// The ClusterIP Service named after the function.
    pub fn service(&self) -> Result<Service> {
        let (_, name) = identity(self)?;
        Ok(Service {
            metadata: crate::labels::owned_meta(self)?,
            spec: Some(ServiceSpec {
                type_: Some("ClusterIP".to_string()),
                selector: Some(selector(&name)),
                ports: Some(vec![
                    port(HTTP_PORT_NAME, SERVICE_HTTP_PORT),
                    port(QUEUE_PORT_NAME, SERVICE_QUEUE_PORT),
                    port(METRICS_PORT_NAME, SERVICE_METRICS_PORT),
                ]),
                ..ServiceSpec::default()
            }),
            status: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::FalFunctionSpec;

    #[test]
    fn service_targets_the_sidecar_ports_by_name() {
        let mut ff = FalFunction::new("app", FalFunctionSpec::with_image("a:1"));
        ff.metadata.namespace = Some("ns".into());
        ff.metadata.uid = Some("u".into());
        let svc = ff.service().unwrap();
        assert_eq!(svc.metadata.name.as_deref(), Some("app"));
        assert_eq!(svc.metadata.owner_references.as_ref().unwrap()[0].uid, "u");
        let spec = svc.spec.unwrap();
        assert_eq!(spec.selector, Some(selector("app")));
        let ports: Vec<_> = spec
            .ports
            .unwrap()
            .into_iter()
            .map(|p| (p.name.unwrap(), p.port, p.target_port.unwrap()))
            .collect();
        assert_eq!(
            ports,
            [
                ("http".to_string(), 80, IntOrString::String("http".into())),
                (
                    "queue".to_string(),
                    8081,
                    IntOrString::String("queue".into())
                ),
                (
                    "metrics".to_string(),
                    9090,
                    IntOrString::String("metrics".into())
                ),
            ]
        );
    }

    #[test]
    fn service_rejects_unnamespaced_functions() {
        let ff = FalFunction::new("app", FalFunctionSpec::with_image("a:1"));
        assert!(ff
            .service()
            .unwrap_err()
            .to_string()
            .starts_with("metadata.namespace"));
    }
}
