// CoreDNS for the test cluster's DNS (the kube-dns Service in kube-system): the
// upstream entry point (coremain) with only the plugins the Corefile of
// scripts/cluster.sh uses, so the build stays small (the full plugin set pulls in
// the cloud SDKs of route53/azure/clouddns). Its own module because CoreDNS pins
// newer grpc/prometheus/otel than Kubernetes v1.37.2: in the control plane's module
// they would change what the Kubernetes binaries are built with.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

// The order plugins see a query in, as in CoreDNS's plugin.cfg.
func init() {
	dnsserver.Directives = []string{"ready", "health", "errors", "log", "loadbalance", "cache", "kubernetes"}
}

func main() { coremain.Run() }
