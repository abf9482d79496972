package main

import (
	"os"
	"path/filepath"
	"sync"
)

// mountPoints: a bind mount needs its target to exist, and the container's mount
// namespace shares the host's filesystem, so a missing target (e.g.
// /var/lib/fal-sidecar) is created on the host. The kubelet creates those directories
// itself, counts the running containers using each, and removes what it created when
// the last one exits (never while another pod's mount may sit on it).
type mountPoints struct {
	mu      sync.Mutex
	refs    map[string]int
	created map[string][]string // target → directories created for it, deepest first
}

func newMountPoints() *mountPoints {
	return &mountPoints{refs: map[string]int{}, created: map[string][]string{}}
}

func (m *mountPoints) acquire(dst string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	dst = filepath.Clean(dst)
	if m.refs[dst] == 0 {
		var missing []string
		for d := dst; d != "/" && d != "."; d = filepath.Dir(d) {
			if _, err := os.Lstat(d); err == nil {
				break
			}
			missing = append(missing, d)
		}
		if err := os.MkdirAll(dst, 0o755); err != nil {
			return err
		}
		m.created[dst] = missing
	}
	m.refs[dst]++
	return nil
}

func (m *mountPoints) release(dst string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	dst = filepath.Clean(dst)
	if m.refs[dst]--; m.refs[dst] > 0 {
		return
	}
	for _, d := range m.created[dst] {
		_ = os.Remove(d) // only if empty
	}
	delete(m.refs, dst)
	delete(m.created, dst)
}
