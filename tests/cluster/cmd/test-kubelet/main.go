// test-kubelet: the node of the test control plane. It registers a Node (with GPU
// capacity and the labels of one machine type of the catalog), keeps its Lease fresh,
// and runs the pods bound to it as local processes: each pod in its own network
// namespace with its own address on a bridge, its volumes as per-pod directories bind
// mounted in a private mount namespace, its env and args. A container whose image is
// the fal-sidecar image runs the workspace's fal-sidecar binary; any other container
// runs its command + args. Probes set Ready; deletion runs preStop hooks, then SIGTERM,
// then SIGKILL at the end of the grace period. An image's config environment is given
// with --image-env (the Python runner image: its PATH and PYTHONPATH pointing at the
// host's python3 and the workspace's runner/), and a failed container with
// terminationMessagePolicy FallbackToLogsOnError reports the end of its log. As the real kubelet, it gives containers
// the Service environment (KUBERNETES_SERVICE_HOST…, enableServiceLinks), an
// /etc/resolv.conf pointing at the cluster DNS (--cluster-dns, dnsPolicy), and mounts
// a PersistentVolumeClaim's hostPath volume.
//
// It is a test harness, not a kubelet: no images, no cgroups, no exec/attach/port-forward;
// of the kubelet API only the logs endpoint (`kubectl logs`), reading
// --state-dir/pods/…/logs/NAME.log.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
)

type config struct {
	kubeconfig   string
	nodeName     string
	stateDir     string
	workDir      string
	sidecarBin   string
	sidecarRepo  string
	bridge       string
	subnet       string // a /24: .1 is the node, pods get .2 … .254
	port         int    // kubelet API (logs) on the node address
	podRoutes    [][2]string
	clusterDNS   string // nameserver of dnsPolicy ClusterFirst pods ("": the host's resolv.conf)
	domain       string // cluster DNS domain
	labels       map[string]string
	capacity     map[string]string
	imageCommand map[string][]string
	imageEnv     map[string][][2]string // image repo → KEY, VALUE its config sets
}

type kvFlag map[string]string

func (k kvFlag) String() string { return fmt.Sprint(map[string]string(k)) }
func (k kvFlag) Set(s string) error {
	key, value, ok := strings.Cut(s, "=")
	if !ok {
		return fmt.Errorf("want KEY=VALUE, got %q", s)
	}
	k[key] = value
	return nil
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == helperCommand {
		runContainerHelper(os.Args[2:]) // never returns
	}
	if len(os.Args) > 1 && os.Args[1] == "dns-query" {
		os.Exit(dnsQuery(os.Args[2:]))
	}
	cfg := config{
		labels: map[string]string{
			// Machine type GPU-T4 of the built-in catalog (any one of its node-affinity
			// terms is enough; two are given).
			"cloud.google.com/gke-accelerator": "nvidia-tesla-t4",
			"nvidia.com/gpu.product":           "Tesla-T4",
		},
		capacity: map[string]string{
			"cpu": "32", "memory": "128Gi", "pods": "110", "nvidia.com/gpu": "4",
			"ephemeral-storage": "100Gi",
		},
		imageCommand: map[string][]string{},
		imageEnv:     map[string][][2]string{},
	}
	labels, capacity, images, routes := kvFlag{}, kvFlag{}, kvFlag{}, kvFlag{}
	flag.StringVar(&cfg.kubeconfig, "kubeconfig", "", "kubeconfig of the control plane")
	flag.StringVar(&cfg.nodeName, "node-name", "fal-test-node", "name of the Node")
	flag.StringVar(&cfg.stateDir, "state-dir", ".cluster/kubelet", "pod directories and container logs")
	flag.StringVar(&cfg.workDir, "workdir", ".", "working directory of containers without workingDir (the 'image' filesystem)")
	flag.StringVar(&cfg.sidecarBin, "sidecar-bin", "fal-sidecar", "the fal-sidecar binary run for the fal-sidecar image")
	flag.StringVar(&cfg.sidecarRepo, "sidecar-image", "fal-sidecar", "an image whose repository ends with this name is the fal-sidecar image")
	flag.StringVar(&cfg.bridge, "bridge", "falk0", "bridge of the pod network (at most 9 characters; also prefixes the pods' netns and veth names)")
	flag.StringVar(&cfg.subnet, "subnet", "198.18.0", "first three octets of the pod /24 (198.18.0.0/15 is reserved for tests)")
	flag.IntVar(&cfg.port, "port", 10250, "port of the kubelet API (kubectl logs) on the node's pod-network address")
	flag.Var(labels, "label", "extra node label KEY=VALUE (repeatable)")
	flag.Var(capacity, "capacity", "node capacity RESOURCE=QUANTITY (repeatable)")
	flag.Var(images, "image-command", "IMAGE_REPO=CMD ARG…: what a container of this image without a command runs (repeatable)")
	flag.Func("image-env", "IMAGE_REPO=KEY=VALUE: an environment variable the image's config sets (repeatable)", func(s string) error {
		repo, kv, ok := strings.Cut(s, "=")
		k, v, ok2 := strings.Cut(kv, "=")
		if !ok || !ok2 || repo == "" || k == "" {
			return fmt.Errorf("want IMAGE_REPO=KEY=VALUE, got %q", s)
		}
		cfg.imageEnv[repo] = append(cfg.imageEnv[repo], [2]string{k, v})
		return nil
	})
	flag.Var(routes, "pod-route", "CIDR=GATEWAY: a route every pod gets besides its default route via the node (repeatable)")
	flag.StringVar(&cfg.clusterDNS, "cluster-dns", "", "nameserver of pods with dnsPolicy ClusterFirst (empty: pods use the host's resolv.conf)")
	flag.StringVar(&cfg.domain, "cluster-domain", "cluster.local", "the cluster's DNS domain (resolv.conf search path)")
	klog.InitFlags(nil)
	flag.Parse()
	for k, v := range labels {
		cfg.labels[k] = v
	}
	for k, v := range capacity {
		cfg.capacity[k] = v
	}
	for k, v := range images {
		cfg.imageCommand[k] = strings.Fields(v)
	}
	for cidr, gw := range routes {
		cfg.podRoutes = append(cfg.podRoutes, [2]string{cidr, gw})
	}
	if len(cfg.bridge) > 9 {
		fmt.Fprintln(os.Stderr, "test-kubelet: --bridge: at most 9 characters (veth names derive from it)")
		os.Exit(2)
	}
	if err := run(cfg); err != nil {
		fmt.Fprintf(os.Stderr, "test-kubelet: %v\n", err)
		os.Exit(1)
	}
}

func run(cfg config) error {
	restCfg, err := clientcmd.BuildConfigFromFlags("", cfg.kubeconfig)
	if err != nil {
		return err
	}
	restCfg.QPS, restCfg.Burst = 50, 100
	client, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(cfg.stateDir, 0o755); err != nil {
		return err
	}
	net, err := newPodNetwork(cfg.bridge, cfg.subnet, cfg.podRoutes)
	if err != nil {
		return fmt.Errorf("pod network: %w", err)
	}
	defer net.teardown()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := serveAPI(ctx, fmt.Sprintf("%s:%d", net.nodeIP(), cfg.port), cfg.stateDir); err != nil {
		return fmt.Errorf("kubelet API: %w", err)
	}
	node := &nodeAgent{client: client, cfg: cfg, ip: net.nodeIP()}
	if err := node.register(ctx); err != nil {
		return fmt.Errorf("registering node %s: %w", cfg.nodeName, err)
	}
	go node.heartbeat(ctx)
	k := newKubelet(client, cfg, net)
	err = k.run(ctx)
	k.shutdown()
	return err
}
