package main

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"syscall"
	"time"
)

// mountPoints: a bind mount needs its target to exist, and the container's mount
// namespace shares the host's filesystem, so a missing target (e.g. /data,
// /var/run/secrets/kubernetes.io/serviceaccount) is created on the host, and removed
// when the last container using it exits.
//
// "Last" is counted across every test kubelet of the machine (two clusters run side
// by side): removing a directory on the host detaches the mounts on it in the other
// containers' namespaces (Linux lazily unmounts mount points of other namespaces on
// rmdir), so a cluster going down would take e.g. the token directory away from the
// pods of another. The count lives in one small file under /run, changed under a
// machine-wide lock; holders are kubelet pids, so a killed kubelet's share is dropped
// by the next kubelet that looks.
type mountPoints struct {
	pid string
}

const (
	mountRegistry = "/run/fal-test-kubelet-mountpoints.json"
	// An abstract unix socket as the machine-wide mutex: bound by one process at a
	// time, released when it closes or dies, and it leaves no file behind.
	mountLockName = "@fal-test-kubelet-mountpoints"
)

type mountEntry struct {
	Created []string       `json:"created"` // directories made for it, deepest first
	Holders map[string]int `json:"holders"` // kubelet pid → containers using it
}

func newMountPoints() *mountPoints {
	return &mountPoints{pid: strconv.Itoa(os.Getpid())}
}

func lockMounts() (func(), error) {
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	addr := &syscall.SockaddrUnix{Name: mountLockName}
	for deadline := time.Now().Add(30 * time.Second); ; {
		if err = syscall.Bind(fd, addr); err == nil {
			return func() { syscall.Close(fd) }, nil
		}
		if !errors.Is(err, syscall.EADDRINUSE) || time.Now().After(deadline) {
			syscall.Close(fd)
			return nil, err
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// update runs fn on the registry under the lock and writes it back (removing the file
// when nothing is registered).
func (m *mountPoints) update(fn func(map[string]*mountEntry) error) error {
	unlock, err := lockMounts()
	if err != nil {
		return err
	}
	defer unlock()
	reg := map[string]*mountEntry{}
	if data, err := os.ReadFile(mountRegistry); err == nil {
		_ = json.Unmarshal(data, &reg) // a damaged file: start afresh
	}
	if err := fn(reg); err != nil {
		return err
	}
	if len(reg) == 0 {
		_ = os.Remove(mountRegistry)
		return nil
	}
	data, _ := json.Marshal(reg)
	tmp := mountRegistry + "." + m.pid
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, mountRegistry)
}

// prune drops the shares of kubelets that are gone.
func prune(e *mountEntry) {
	for pid := range e.Holders {
		n, _ := strconv.Atoi(pid)
		if n <= 0 || syscall.Kill(n, 0) == syscall.ESRCH {
			delete(e.Holders, pid)
		}
	}
}

func (m *mountPoints) acquire(dst string) error {
	dst = filepath.Clean(dst)
	return m.update(func(reg map[string]*mountEntry) error {
		e := reg[dst]
		if e == nil {
			e = &mountEntry{Holders: map[string]int{}}
		}
		prune(e)
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
		// Directories a killed kubelet made are still to be removed.
		e.Created = append(e.Created, missing...)
		e.Holders[m.pid]++
		reg[dst] = e
		return nil
	})
}

func (m *mountPoints) release(dst string) {
	dst = filepath.Clean(dst)
	_ = m.update(func(reg map[string]*mountEntry) error {
		e := reg[dst]
		if e == nil {
			return nil
		}
		if e.Holders[m.pid]--; e.Holders[m.pid] <= 0 {
			delete(e.Holders, m.pid)
		}
		prune(e)
		if len(e.Holders) > 0 {
			return nil
		}
		// Deepest first; only empty directories (never another mount's content).
		sort.Slice(e.Created, func(i, j int) bool { return len(e.Created[i]) > len(e.Created[j]) })
		for _, d := range e.Created {
			_ = os.Remove(d)
		}
		delete(reg, dst)
		return nil
	})
}
