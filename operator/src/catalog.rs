//! The machine catalog: machine type name → CPU, memory, GPUs and node placement.
//!
//! Built-in defaults cover fal's CPU sizes and common NVIDIA GPUs. GPU types select
//! nodes portably with OR-ed node-affinity terms, one per labelling scheme: GKE
//! (`cloud.google.com/gke-accelerator`), Karpenter on AWS
//! (`karpenter.k8s.aws/instance-gpu-name`) and NVIDIA GPU feature discovery
//! (`nvidia.com/gpu.product`), so one manifest schedules on any of them.
//! A YAML file (`--catalog`, mounted by the Helm chart) overrides entries by name and
//! adds new ones.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    ResourceRequirements, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde::{Deserialize, Serialize};

use crate::crd::FalFunctionSpec;
use crate::{Error, Result};

/// Extended resource name of NVIDIA GPUs (device plugin).
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// GKE's accelerator node label.
pub const GKE_ACCELERATOR_LABEL: &str = "cloud.google.com/gke-accelerator";
/// Karpenter (AWS) GPU name node label.
pub const KARPENTER_GPU_NAME_LABEL: &str = "karpenter.k8s.aws/instance-gpu-name";
/// Karpenter (AWS) GPU memory node label, in MiB.
pub const KARPENTER_GPU_MEMORY_LABEL: &str = "karpenter.k8s.aws/instance-gpu-memory";
/// NVIDIA GPU feature discovery product label.
pub const GFD_PRODUCT_LABEL: &str = "nvidia.com/gpu.product";

/// One machine type. Quantities are written in canonical form (`500m`, `16Gi`) so the
/// objects the operator applies compare equal to what the apiserver stores.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MachineType {
    /// CPU request of the app container.
    pub cpu: Quantity,
    /// Memory request and limit of the app container.
    pub memory: Quantity,
    /// `nvidia.com/gpu` limit; 0 for CPU machine types.
    #[serde(default)]
    pub gpus: i32,
    /// OR-ed node selector terms (required node affinity).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_selector_terms: Vec<NodeSelectorTerm>,
    /// Plain node selector labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations the pods get.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
}

/// The catalog file format: `machineTypes: {NAME: MachineType}`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CatalogFile {
    /// When true, the built-in machine types are dropped and only the file's are used.
    #[serde(default)]
    pub replace_defaults: bool,
    /// Entries replace built-ins of the same name and add new names.
    #[serde(default)]
    pub machine_types: BTreeMap<String, MachineType>,
}

/// Machine types by name.
#[derive(Clone, Debug, PartialEq)]
pub struct MachineCatalog {
    types: BTreeMap<String, MachineType>,
}

/// What a FalFunction's pods get from its machine type after its own overrides.
#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    /// Name of the resolved machine type.
    pub machine_type: String,
    /// GPUs per pod after `numGpus`.
    pub gpus: i32,
    /// Resources of the app container.
    pub resources: ResourceRequirements,
    /// Pod node selector (None when empty).
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Pod tolerations (None when empty).
    pub tolerations: Option<Vec<Toleration>>,
    /// Pod affinity (None when empty).
    pub affinity: Option<Affinity>,
}

impl Default for MachineCatalog {
    fn default() -> Self {
        Self::builtin()
    }
}

fn q(s: &str) -> Quantity {
    Quantity(s.to_string())
}

fn cpu_type(cpu: &str, memory: &str) -> MachineType {
    MachineType {
        cpu: q(cpu),
        memory: q(memory),
        ..MachineType::default()
    }
}

fn requirement(key: &str, values: &[&str]) -> NodeSelectorRequirement {
    NodeSelectorRequirement {
        key: key.to_string(),
        operator: "In".to_string(),
        values: Some(values.iter().map(|v| v.to_string()).collect()),
    }
}

fn term(requirements: Vec<NodeSelectorRequirement>) -> NodeSelectorTerm {
    NodeSelectorTerm {
        match_expressions: Some(requirements),
        match_fields: None,
    }
}

/// The GPU labels of one accelerator under each labelling scheme; `None` where the
/// scheme has no such GPU (GKE offers no A10G).
struct GpuLabels {
    gke: Option<&'static str>,
    karpenter: &'static str,
    /// Karpenter GPU memory in MiB, to tell A100 40GB from 80GB.
    karpenter_memory: Option<&'static str>,
    gfd: &'static str,
}

fn gpu_type(cpu: &str, memory: &str, labels: GpuLabels) -> MachineType {
    let mut terms = Vec::new();
    if let Some(gke) = labels.gke {
        terms.push(term(vec![requirement(GKE_ACCELERATOR_LABEL, &[gke])]));
    }
    let mut karpenter = vec![requirement(KARPENTER_GPU_NAME_LABEL, &[labels.karpenter])];
    if let Some(mem) = labels.karpenter_memory {
        karpenter.push(requirement(KARPENTER_GPU_MEMORY_LABEL, &[mem]));
    }
    terms.push(term(karpenter));
    terms.push(term(vec![requirement(GFD_PRODUCT_LABEL, &[labels.gfd])]));
    MachineType {
        cpu: q(cpu),
        memory: q(memory),
        gpus: 1,
        node_selector_terms: terms,
        node_selector: BTreeMap::new(),
        tolerations: vec![Toleration {
            key: Some(GPU_RESOURCE.to_string()),
            operator: Some("Exists".to_string()),
            effect: Some("NoSchedule".to_string()),
            ..Toleration::default()
        }],
    }
}

impl MachineCatalog {
    /// The built-in machine types. CPU and memory are sized to fit the smallest common
    /// single-GPU node of each kind after system reservations (e.g. T4, A10G and L4 on
    /// 4 vCPU / 16 GiB nodes).
    pub fn builtin() -> Self {
        let mut types = BTreeMap::new();
        types.insert("XS".into(), cpu_type("500m", "512Mi"));
        types.insert("S".into(), cpu_type("1", "1Gi"));
        types.insert("M".into(), cpu_type("2", "8Gi"));
        types.insert("L".into(), cpu_type("4", "32Gi"));
        #[rustfmt::skip]
        let gpus = [
            ("GPU-T4", "3", "12Gi", GpuLabels { gke: Some("nvidia-tesla-t4"), karpenter: "t4", karpenter_memory: None, gfd: "Tesla-T4" }),
            ("GPU-A10G", "3", "12Gi", GpuLabels { gke: None, karpenter: "a10g", karpenter_memory: None, gfd: "NVIDIA-A10G" }),
            ("GPU-L4", "3", "12Gi", GpuLabels { gke: Some("nvidia-l4"), karpenter: "l4", karpenter_memory: None, gfd: "NVIDIA-L4" }),
            ("GPU-A100", "10", "72Gi", GpuLabels { gke: Some("nvidia-tesla-a100"), karpenter: "a100", karpenter_memory: Some("40960"), gfd: "NVIDIA-A100-SXM4-40GB" }),
            ("GPU-A100-80G", "10", "144Gi", GpuLabels { gke: Some("nvidia-a100-80gb"), karpenter: "a100", karpenter_memory: Some("81920"), gfd: "NVIDIA-A100-SXM4-80GB" }),
            ("GPU-H100", "24", "200Gi", GpuLabels { gke: Some("nvidia-h100-80gb"), karpenter: "h100", karpenter_memory: None, gfd: "NVIDIA-H100-80GB-HBM3" }),
        ];
        for (name, cpu, memory, labels) in gpus {
            types.insert(name.into(), gpu_type(cpu, memory, labels));
        }
        MachineCatalog { types }
    }

    /// Builds a catalog from the built-ins and a catalog file's contents.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Self> {
        let file: CatalogFile = serde_yaml::from_str(text).map_err(|source| Error::Yaml {
            context: format!("machine catalog {origin}"),
            source,
        })?;
        let mut catalog = if file.replace_defaults {
            MachineCatalog {
                types: BTreeMap::new(),
            }
        } else {
            Self::builtin()
        };
        for (name, machine) in file.machine_types {
            if machine.gpus < 0 {
                return Err(Error::invalid(
                    format!("machine catalog {origin}: machineTypes.{name}.gpus"),
                    "must not be negative",
                ));
            }
            catalog.types.insert(name, machine);
        }
        if catalog.types.is_empty() {
            return Err(Error::invalid(
                format!("machine catalog {origin}: machineTypes"),
                "defines no machine type",
            ));
        }
        Ok(catalog)
    }

    /// Loads the built-ins, then the file at `path` if given.
    pub fn load(path: Option<&std::path::Path>) -> Result<Self> {
        match path {
            None => Ok(Self::builtin()),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
                    path: path.display().to_string(),
                    source,
                })?;
                Self::from_yaml(&text, &path.display().to_string())
            }
        }
    }

    /// The machine type called `name`.
    pub fn get(&self, name: &str) -> Option<&MachineType> {
        self.types.get(name)
    }

    /// All machine type names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.types.keys().map(String::as_str)
    }

    /// Resolves `spec.machineType` and applies the spec's per-function overrides.
    pub fn placement(&self, spec: &FalFunctionSpec) -> Result<Placement> {
        let machine = self
            .get(&spec.machine_type)
            .ok_or_else(|| Error::UnknownMachineType {
                name: spec.machine_type.clone(),
                known: self.names().collect::<Vec<_>>().join(", "),
            })?;
        let gpus = match spec.num_gpus {
            Some(n) if machine.gpus == 0 => {
                return Err(Error::invalid(
                    "spec.numGpus",
                    format!(
                    "{n} GPUs requested but machine type {} has no GPU; pick a GPU-* machine type",
                    spec.machine_type
                ),
                ))
            }
            Some(n) if n < 1 => return Err(Error::invalid("spec.numGpus", "must be at least 1")),
            Some(n) => n,
            None => machine.gpus,
        };
        Ok(Placement {
            machine_type: spec.machine_type.clone(),
            gpus,
            resources: merge_resources(machine, gpus, spec.resources.as_ref()),
            node_selector: merge_node_selector(machine, spec.node_selector.as_ref()),
            tolerations: match &spec.tolerations {
                Some(own) => non_empty(own.clone()),
                None => non_empty(machine.tolerations.clone()),
            },
            affinity: merge_affinity(machine, spec.affinity.as_ref()),
        })
    }
}

fn non_empty<T>(v: Vec<T>) -> Option<Vec<T>> {
    (!v.is_empty()).then_some(v)
}

/// Catalog resources (CPU request; memory request = limit, so the pod cannot be
/// OOM-killed for its neighbours' sake; no CPU limit, which only throttles; GPU limit),
/// then the function's own requests/limits key by key on top.
fn merge_resources(
    machine: &MachineType,
    gpus: i32,
    own: Option<&ResourceRequirements>,
) -> ResourceRequirements {
    let mut requests = BTreeMap::from([
        ("cpu".to_string(), machine.cpu.clone()),
        ("memory".to_string(), machine.memory.clone()),
    ]);
    let mut limits = BTreeMap::from([("memory".to_string(), machine.memory.clone())]);
    if gpus > 0 {
        limits.insert(GPU_RESOURCE.to_string(), q(&gpus.to_string()));
    }
    let mut claims = None;
    if let Some(own) = own {
        let own_requests = own.requests.clone().unwrap_or_default();
        let own_limits = own.limits.clone().unwrap_or_default();
        // A limit set without a request pulls the catalog's request along (what
        // Kubernetes does for a container without requests), so lowering a limit never
        // leaves a request above it.
        for (name, limit) in &own_limits {
            if !own_requests.contains_key(name) && requests.contains_key(name) {
                requests.insert(name.clone(), limit.clone());
            }
        }
        requests.extend(own_requests);
        limits.extend(own_limits);
        claims = own.claims.clone();
    }
    // Extended resources (GPUs) may not have a request different from the limit; the
    // apiserver defaults the request from the limit.
    requests.remove(GPU_RESOURCE);
    ResourceRequirements {
        claims,
        limits: Some(limits),
        requests: Some(requests),
    }
}

fn merge_node_selector(
    machine: &MachineType,
    own: Option<&BTreeMap<String, String>>,
) -> Option<BTreeMap<String, String>> {
    let mut selector = machine.node_selector.clone();
    if let Some(own) = own {
        selector.extend(own.clone());
    }
    (!selector.is_empty()).then_some(selector)
}

fn merge_affinity(machine: &MachineType, own: Option<&Affinity>) -> Option<Affinity> {
    let catalog_node_affinity = (!machine.node_selector_terms.is_empty()).then(|| NodeAffinity {
        required_during_scheduling_ignored_during_execution: Some(NodeSelector {
            node_selector_terms: machine.node_selector_terms.clone(),
        }),
        preferred_during_scheduling_ignored_during_execution: None,
    });
    let mut affinity = own.cloned().unwrap_or_default();
    if affinity.node_affinity.is_none() {
        affinity.node_affinity = catalog_node_affinity;
    }
    (affinity != Affinity::default()).then_some(affinity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodAffinity, PodAffinityTerm};

    const ALL: [&str; 10] = [
        "XS",
        "S",
        "M",
        "L",
        "GPU-T4",
        "GPU-A10G",
        "GPU-L4",
        "GPU-A100",
        "GPU-A100-80G",
        "GPU-H100",
    ];

    fn spec(machine: &str) -> FalFunctionSpec {
        let mut spec = FalFunctionSpec::with_image("app:1");
        spec.machine_type = machine.into();
        spec
    }

    fn terms(p: &Placement) -> Vec<(String, Vec<String>)> {
        p.affinity
            .as_ref()
            .unwrap()
            .node_affinity
            .as_ref()
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .as_ref()
            .unwrap()
            .node_selector_terms
            .iter()
            .map(|t| {
                let exprs = t.match_expressions.as_ref().unwrap();
                let key = exprs
                    .iter()
                    .map(|e| e.key.as_str())
                    .collect::<Vec<_>>()
                    .join("+");
                let vals = exprs
                    .iter()
                    .flat_map(|e| e.values.clone().unwrap())
                    .collect();
                (key, vals)
            })
            .collect()
    }

    #[test]
    fn builtin_has_exactly_the_documented_types() {
        let catalog = MachineCatalog::builtin();
        assert_eq!(catalog.names().collect::<Vec<_>>(), {
            let mut v = ALL.to_vec();
            v.sort();
            v
        });
    }

    #[test]
    fn cpu_types_set_only_resources() {
        let catalog = MachineCatalog::builtin();
        for (name, cpu, mem) in [
            ("XS", "500m", "512Mi"),
            ("S", "1", "1Gi"),
            ("M", "2", "8Gi"),
            ("L", "4", "32Gi"),
        ] {
            let p = catalog.placement(&spec(name)).unwrap();
            assert_eq!(p.gpus, 0, "{name}");
            assert_eq!(p.affinity, None, "{name}");
            assert_eq!(p.tolerations, None, "{name}");
            assert_eq!(p.node_selector, None, "{name}");
            let req = p.resources.requests.unwrap();
            assert_eq!(req["cpu"], q(cpu), "{name}");
            assert_eq!(req["memory"], q(mem), "{name}");
            let lim = p.resources.limits.unwrap();
            assert_eq!(lim["memory"], q(mem), "{name}");
            assert!(!lim.contains_key("cpu"), "no CPU limit: it only throttles");
            assert!(!lim.contains_key(GPU_RESOURCE), "{name}");
        }
    }

    #[test]
    fn gpu_types_get_or_ed_terms_toleration_and_limit() {
        let catalog = MachineCatalog::builtin();
        // machine type, GKE, Karpenter name, Karpenter memory, GFD product
        type Row = (
            &'static str,
            Option<&'static str>,
            &'static str,
            Option<&'static str>,
            &'static str,
        );
        #[rustfmt::skip]
        let expected: [Row; 6] = [
            ("GPU-T4", Some("nvidia-tesla-t4"), "t4", None, "Tesla-T4"),
            ("GPU-A10G", None, "a10g", None, "NVIDIA-A10G"),
            ("GPU-L4", Some("nvidia-l4"), "l4", None, "NVIDIA-L4"),
            ("GPU-A100", Some("nvidia-tesla-a100"), "a100", Some("40960"), "NVIDIA-A100-SXM4-40GB"),
            ("GPU-A100-80G", Some("nvidia-a100-80gb"), "a100", Some("81920"), "NVIDIA-A100-SXM4-80GB"),
            ("GPU-H100", Some("nvidia-h100-80gb"), "h100", None, "NVIDIA-H100-80GB-HBM3"),
        ];
        for (name, gke, karpenter, karpenter_mem, gfd) in expected {
            let p = catalog.placement(&spec(name)).unwrap();
            let mut want = Vec::new();
            if let Some(gke) = gke {
                want.push((GKE_ACCELERATOR_LABEL.to_string(), vec![gke.to_string()]));
            }
            match karpenter_mem {
                Some(mem) => want.push((
                    format!("{KARPENTER_GPU_NAME_LABEL}+{KARPENTER_GPU_MEMORY_LABEL}"),
                    vec![karpenter.to_string(), mem.to_string()],
                )),
                None => want.push((
                    KARPENTER_GPU_NAME_LABEL.to_string(),
                    vec![karpenter.to_string()],
                )),
            }
            want.push((GFD_PRODUCT_LABEL.to_string(), vec![gfd.to_string()]));
            assert_eq!(terms(&p), want, "{name}");
            let tol = p.tolerations.unwrap();
            assert_eq!(tol.len(), 1);
            assert_eq!(tol[0].key.as_deref(), Some(GPU_RESOURCE));
            assert_eq!(tol[0].operator.as_deref(), Some("Exists"));
            assert_eq!(tol[0].effect.as_deref(), Some("NoSchedule"));
            let limits = p.resources.limits.unwrap();
            assert_eq!(limits[GPU_RESOURCE], q("1"), "{name}");
            assert!(!p.resources.requests.unwrap().contains_key(GPU_RESOURCE));
        }
    }

    #[test]
    fn unknown_machine_type_names_the_field_and_the_choices() {
        let err = MachineCatalog::builtin()
            .placement(&spec("GPU-B200"))
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("spec.machineType: unknown machine type \"GPU-B200\""),
            "{text}"
        );
        assert!(text.contains("GPU-T4") && text.contains("XS"), "{text}");
        assert!(err.is_spec_error());
    }

    #[test]
    fn num_gpus_overrides_count_and_is_rejected_on_cpu_types() {
        let catalog = MachineCatalog::builtin();
        let mut s = spec("GPU-H100");
        s.num_gpus = Some(8);
        let p = catalog.placement(&s).unwrap();
        assert_eq!(p.gpus, 8);
        assert_eq!(p.resources.limits.unwrap()[GPU_RESOURCE], q("8"));

        let mut s = spec("M");
        s.num_gpus = Some(1);
        let err = catalog.placement(&s).unwrap_err().to_string();
        assert!(err.starts_with("spec.numGpus:"), "{err}");
    }

    #[test]
    fn function_overrides_win_over_the_catalog() {
        let catalog = MachineCatalog::builtin();
        let mut s = spec("GPU-T4");
        s.resources = Some(ResourceRequirements {
            limits: Some(BTreeMap::from([("memory".to_string(), q("8Gi"))])),
            requests: Some(BTreeMap::from([("cpu".to_string(), q("1500m"))])),
            claims: None,
        });
        s.node_selector = Some(BTreeMap::from([("pool".into(), "gpu".into())]));
        s.tolerations = Some(vec![Toleration {
            key: Some("dedicated".into()),
            operator: Some("Equal".into()),
            value: Some("ml".into()),
            effect: Some("NoSchedule".into()),
            ..Toleration::default()
        }]);
        let pod_affinity = PodAffinity {
            required_during_scheduling_ignored_during_execution: Some(vec![PodAffinityTerm {
                topology_key: "kubernetes.io/hostname".into(),
                ..PodAffinityTerm::default()
            }]),
            ..PodAffinity::default()
        };
        s.affinity = Some(Affinity {
            pod_affinity: Some(pod_affinity.clone()),
            ..Affinity::default()
        });
        let p = catalog.placement(&s).unwrap();
        let req = p.resources.requests.clone().unwrap();
        let lim = p.resources.limits.clone().unwrap();
        assert_eq!(req["cpu"], q("1500m"), "own request wins");
        assert_eq!(lim["memory"], q("8Gi"), "own limit wins");
        assert_eq!(
            req["memory"],
            q("8Gi"),
            "catalog request follows a lowered limit"
        );
        assert_eq!(lim[GPU_RESOURCE], q("1"), "GPU limit kept");
        assert_eq!(p.node_selector.as_ref().unwrap()["pool"], "gpu");
        let tol = p.tolerations.clone().unwrap();
        assert_eq!(tol.len(), 1, "own tolerations replace the catalog's");
        assert_eq!(tol[0].key.as_deref(), Some("dedicated"));
        let affinity = p.affinity.clone().unwrap();
        assert_eq!(affinity.pod_affinity, Some(pod_affinity), "passed through");
        assert_eq!(terms(&p).len(), 3, "catalog node affinity kept");

        // An own nodeAffinity replaces the catalog's.
        let own_node = NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![term(vec![requirement("gpu", &["yes"])])],
            }),
            preferred_during_scheduling_ignored_during_execution: None,
        };
        s.affinity = Some(Affinity {
            node_affinity: Some(own_node.clone()),
            ..Affinity::default()
        });
        let p = catalog.placement(&s).unwrap();
        assert_eq!(p.affinity.unwrap().node_affinity, Some(own_node));

        // Empty own tolerations drop the catalog's.
        s.tolerations = Some(vec![]);
        assert_eq!(catalog.placement(&s).unwrap().tolerations, None);
    }

    #[test]
    fn catalog_file_overrides_and_extends() {
        let text = r#"
machineTypes:
  XS:
    cpu: 250m
    memory: 256Mi
  GPU-RTX4090:
    cpu: "8"
    memory: 48Gi
    gpus: 1
    nodeSelector: {gpu: rtx4090}
    tolerations:
      - {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}
"#;
        let catalog = MachineCatalog::from_yaml(text, "test").unwrap();
        let xs = catalog.placement(&spec("XS")).unwrap();
        assert_eq!(xs.resources.requests.unwrap()["cpu"], q("250m"));
        let rtx = catalog.placement(&spec("GPU-RTX4090")).unwrap();
        assert_eq!(rtx.gpus, 1);
        assert_eq!(rtx.node_selector.unwrap()["gpu"], "rtx4090");
        assert_eq!(rtx.affinity, None);
        assert!(catalog.get("GPU-H100").is_some(), "built-ins kept");

        let only = MachineCatalog::from_yaml(
            "replaceDefaults: true\nmachineTypes: {tiny: {cpu: 100m, memory: 64Mi}}",
            "test",
        )
        .unwrap();
        assert_eq!(only.names().collect::<Vec<_>>(), ["tiny"]);
    }

    #[test]
    fn bad_catalog_files_are_rejected_with_the_field() {
        let err = MachineCatalog::from_yaml("machineTypes: {X: {cpu: 1}}", "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("c.yaml") && err.contains("memory"), "{err}");
        let err =
            MachineCatalog::from_yaml("machineTypes: {X: {cpu: 1, memory: 1Gi, gpu: 2}}", "c.yaml")
                .unwrap_err()
                .to_string();
        assert!(err.contains("unknown field `gpu`"), "{err}");
        let err = MachineCatalog::from_yaml(
            "machineTypes: {X: {cpu: 1, memory: 1Gi, gpus: -1}}",
            "c.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("machineTypes.X.gpus"), "{err}");
        let err = MachineCatalog::from_yaml("replaceDefaults: true", "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("defines no machine type"), "{err}");
        let err = MachineCatalog::load(Some(std::path::Path::new("/nonexistent/c.yaml")))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("reading /nonexistent/c.yaml"), "{err}");
    }
}
