package main

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
)

// podNetwork: a bridge on the host holding the node address (.1 of a /24) and one
// network namespace per pod, joined to the bridge by a veth pair, with its own
// address. Host ↔ pod and pod ↔ pod traffic stays on the bridge; nothing is routed
// off the machine (no default route on the host side, no NAT, the host does not
// forward). Extra routes (--pod-route) send e.g. the Service range to the address on
// the bridge that routes it (scripts/cluster.sh: kube-proxy's own namespace at .254,
// which is why pods get .2 … .253 only).
type podNetwork struct {
	bridge string
	subnet string
	routes [][2]string // CIDR, gateway: routes every pod gets
	owned  bool        // the bridge was made here (else whoever made it removes it)
	mu     sync.Mutex
	used   map[int]string // last octet → pod key
}

// Pods get .2 … lastPodOctet; .1 is the node, .254 is left to the caller (the
// Service router of scripts/cluster.sh).
const lastPodOctet = 253

func ipCmd(args ...string) error {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func newPodNetwork(bridge, subnet string, routes [][2]string) (*podNetwork, error) {
	n := &podNetwork{bridge: bridge, subnet: subnet, routes: routes, used: map[int]string{}}
	n.removeStale()
	// A bridge that already holds the node address was made by scripts/cluster.sh
	// (the apiserver listens on that address before this kubelet starts): keep it.
	if out, err := exec.Command("ip", "-o", "-4", "addr", "show", "dev", bridge).Output(); err == nil &&
		strings.Contains(string(out), " "+n.nodeIP()+"/24 ") {
		return n, nil
	}
	n.owned = true
	_ = ipCmd("link", "del", bridge)
	for _, args := range [][]string{
		{"link", "add", bridge, "type", "bridge"},
		{"addr", "add", n.nodeIP() + "/24", "dev", bridge},
		{"link", "set", bridge, "up"},
	} {
		if err := ipCmd(args...); err != nil {
			return nil, err
		}
	}
	return n, nil
}

func (n *podNetwork) nodeIP() string { return n.subnet + ".1" }

// removeStale deletes namespaces a previous run left behind (its pods are gone).
func (n *podNetwork) removeStale() {
	entries, _ := os.ReadDir("/run/netns")
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), n.bridge+"-") {
			_ = ipCmd("netns", "del", e.Name())
		}
	}
}

func (n *podNetwork) teardown() {
	n.removeStale()
	if n.owned {
		_ = ipCmd("link", "del", n.bridge)
	}
}

// add creates the namespace of a pod and returns its name and address.
func (n *podNetwork) add(key string) (netns, ip string, err error) {
	n.mu.Lock()
	octet := 0
	for i := 2; i <= lastPodOctet; i++ {
		if _, taken := n.used[i]; !taken {
			octet = i
			n.used[i] = key
			break
		}
	}
	n.mu.Unlock()
	if octet == 0 {
		return "", "", fmt.Errorf("pod network %s.0/24 is full", n.subnet)
	}
	// Names carry the bridge's, so two clusters on one machine do not collide.
	netns = fmt.Sprintf("%s-%d", n.bridge, octet)
	ip = fmt.Sprintf("%s.%d", n.subnet, octet)
	host := fmt.Sprintf("%sh%d", n.bridge, octet)
	peer := fmt.Sprintf("%sp%d", n.bridge, octet)
	// The MAC follows the address (0a:58 + the IPv4 bytes, as OVN-Kubernetes does):
	// neighbours (the host, the Service router) that cached the address of a previous
	// pod with this IP still reach the new one, instead of seconds of stale ARP.
	var a, b, c, d int
	fmt.Sscanf(ip, "%d.%d.%d.%d", &a, &b, &c, &d)
	mac := fmt.Sprintf("0a:58:%02x:%02x:%02x:%02x", a, b, c, d)
	_ = ipCmd("netns", "del", netns)
	_ = ipCmd("link", "del", host)
	for _, args := range [][]string{
		{"netns", "add", netns},
		{"link", "add", host, "type", "veth", "peer", "name", peer, "address", mac},
		{"link", "set", peer, "netns", netns},
		{"link", "set", host, "master", n.bridge},
		{"link", "set", host, "up"},
		{"-n", netns, "link", "set", peer, "name", "eth0"},
		{"-n", netns, "addr", "add", ip + "/24", "dev", "eth0"},
		{"-n", netns, "link", "set", "eth0", "up"},
		{"-n", netns, "link", "set", "lo", "up"},
		{"-n", netns, "route", "add", "default", "via", n.nodeIP()},
	} {
		if err = ipCmd(args...); err != nil {
			n.remove(netns, ip)
			return "", "", err
		}
	}
	for _, r := range n.routes {
		if err = ipCmd("-n", netns, "route", "add", r[0], "via", r[1]); err != nil {
			n.remove(netns, ip)
			return "", "", err
		}
	}
	return netns, ip, nil
}

func (n *podNetwork) remove(netns, ip string) {
	var octet int
	fmt.Sscanf(strings.TrimPrefix(ip, n.subnet+"."), "%d", &octet)
	_ = ipCmd("netns", "del", netns) // takes the veth pair with it
	_ = ipCmd("link", "del", fmt.Sprintf("%sh%d", n.bridge, octet))
	n.mu.Lock()
	delete(n.used, octet)
	n.mu.Unlock()
}
