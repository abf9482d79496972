package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
)

// resolvConfContent: the /etc/resolv.conf of the pod's containers for its dnsPolicy, as the
// kubelet writes it ("" = keep the host's: dnsPolicy Default, or no cluster DNS).
func (w *podWorker) resolvConfContent() string {
	spec := w.pod.Spec
	cfg := w.k.cfg
	var servers, searches, options []string
	switch spec.DNSPolicy {
	case corev1.DNSDefault:
		return ""
	case corev1.DNSNone:
	default: // ClusterFirst (the default), ClusterFirstWithHostNet
		if cfg.clusterDNS == "" {
			return ""
		}
		servers = []string{cfg.clusterDNS}
		searches = []string{w.pod.Namespace + ".svc." + cfg.domain, "svc." + cfg.domain, cfg.domain}
		options = []string{"ndots:5"}
	}
	if dc := spec.DNSConfig; dc != nil {
		servers = append(servers, dc.Nameservers...)
		searches = append(searches, dc.Searches...)
		for _, o := range dc.Options {
			opt := o.Name
			if o.Value != nil {
				opt += ":" + *o.Value
			}
			// A pod's option replaces the default of the same name (ndots:2 for ndots:5).
			name := strings.SplitN(opt, ":", 2)[0]
			kept := options[:0]
			for _, old := range options {
				if strings.SplitN(old, ":", 2)[0] != name {
					kept = append(kept, old)
				}
			}
			options = append(kept, opt)
		}
	}
	var b strings.Builder
	if len(searches) > 0 {
		fmt.Fprintf(&b, "search %s\n", strings.Join(searches, " "))
	}
	for _, s := range servers {
		fmt.Fprintf(&b, "nameserver %s\n", s)
	}
	if len(options) > 0 {
		fmt.Fprintf(&b, "options %s\n", strings.Join(options, " "))
	}
	return b.String()
}

// writeResolvConf writes the pod's resolv.conf into its directory; containers get it
// bind mounted at /etc/resolv.conf in their own mount namespace ("" if none).
func (w *podWorker) writeResolvConf() (string, error) {
	content := w.resolvConfContent()
	if content == "" {
		return "", nil
	}
	p := filepath.Join(w.dir, "resolv.conf")
	return p, os.WriteFile(p, []byte(content), 0o644)
}

// dnsQuery: `test-kubelet dns-query SERVER NAME` resolves NAME (A records) at
// SERVER:53 only, printing the addresses; exit status 1 when it does not answer.
// scripts/cluster.sh waits with it until the cluster DNS answers through its Service.
func dnsQuery(args []string) int {
	if len(args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: test-kubelet dns-query SERVER NAME")
		return 2
	}
	server := net.JoinHostPort(args[0], "53")
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, server)
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	addrs, err := r.LookupIP(ctx, "ip4", args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	for _, a := range addrs {
		fmt.Println(a)
	}
	return 0
}
