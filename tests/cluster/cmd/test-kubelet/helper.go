package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// helperCommand re-executes this binary as the first process of a container: started
// by the kubelet in a fresh mount namespace, it bind mounts the pod's volumes, enters
// the pod's network namespace, changes directory and execs the container's command
// (so the container's pid is this process's pid).
const helperCommand = "__run-container"

type bind struct {
	Src, Dst string
	ReadOnly bool
	File     bool // a file over an existing file (resolv.conf), not a directory
}

type helperSpec struct {
	Netns string
	Binds []bind
	Dir   string // the container's workingDir, entered after the mounts
	// The "image filesystem" root, for containers without a workingDir: opened before
	// the mounts (a volume over a directory above it must not hide it).
	ImageDir string
	Argv     []string
	Env      []string
}

func helperFail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "test-kubelet: container start: "+format+"\n", args...)
	os.Exit(128)
}

func runContainerHelper(args []string) {
	runtime.LockOSThread() // setns and execve must happen on the same thread
	var spec helperSpec
	if len(args) != 1 || json.Unmarshal([]byte(args[0]), &spec) != nil || len(spec.Argv) == 0 {
		helperFail("bad helper arguments")
	}
	// The namespace is new (CLONE_NEWNS) but shares propagation with the host: make
	// it private so the volume mounts below stay inside this container.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		helperFail("making / private: %v", err)
	}
	// Every source is opened before anything is mounted: a volume mounted over a
	// directory that holds a later source (an emptyDir at /tmp while the cluster's
	// state lives under /tmp) would hide that source. The mounts then take the open
	// file (/proc/self/fd/N), not the path.
	imageDir := -1
	if spec.Dir == "" {
		fd, err := unix.Open(spec.ImageDir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			helperFail("image directory %s: %v", spec.ImageDir, err)
		}
		imageDir = fd
	}
	srcs := make([]string, len(spec.Binds))
	for i, b := range spec.Binds {
		fd, err := unix.Open(b.Src, unix.O_PATH|unix.O_CLOEXEC, 0)
		if err != nil {
			helperFail("volume source %s: %v", b.Src, err)
		}
		srcs[i] = fmt.Sprintf("/proc/self/fd/%d", fd)
	}
	for i, b := range spec.Binds {
		if b.File {
			// Mounted over the host's file, in this namespace only; never created.
		} else if err := os.MkdirAll(b.Dst, 0o755); err != nil {
			helperFail("mount point %s: %v", b.Dst, err)
		}
		if err := unix.Mount(srcs[i], b.Dst, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			helperFail("mounting %s at %s: %v", b.Src, b.Dst, err)
		}
		if b.ReadOnly {
			if err := unix.Mount("", b.Dst, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
				helperFail("read-only %s: %v", b.Dst, err)
			}
		}
	}
	if spec.Netns != "" {
		fd, err := unix.Open("/run/netns/"+spec.Netns, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			helperFail("netns %s: %v", spec.Netns, err)
		}
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			helperFail("entering netns %s: %v", spec.Netns, err)
		}
		unix.Close(fd)
	}
	if imageDir >= 0 {
		if err := unix.Fchdir(imageDir); err != nil {
			helperFail("image directory %s: %v", spec.ImageDir, err)
		}
	} else if err := os.Chdir(spec.Dir); err != nil {
		helperFail("workingDir %s: %v", spec.Dir, err)
	}
	path := spec.Argv[0]
	if !strings.Contains(path, "/") {
		for _, e := range spec.Env {
			if v, ok := strings.CutPrefix(e, "PATH="); ok {
				os.Setenv("PATH", v)
			}
		}
		p, err := exec.LookPath(path)
		if err != nil {
			helperFail("%s: executable not found in PATH", path)
		}
		path = p
	}
	err := syscall.Exec(path, spec.Argv, spec.Env)
	helperFail("exec %s: %v", path, err)
}

// helperCmd prepares the process of a container (or of an exec hook/probe).
func helperCmd(spec helperSpec) (*exec.Cmd, error) {
	data, err := json.Marshal(spec)
	if err != nil {
		return nil, err
	}
	// /proc/self/exe, not the path: the binary in the shared build cache may have been
	// replaced meanwhile (another checkout built another version of it).
	cmd := exec.Command("/proc/self/exe", helperCommand, string(data))
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags: syscall.CLONE_NEWNS,
		Setpgid:    true, // signals go to the container's whole process group
	}
	return cmd, nil
}
