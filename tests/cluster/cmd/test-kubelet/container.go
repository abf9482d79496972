package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/klog/v2"
)

type runState int

const (
	stateNone        runState = iota // never started
	stateRunning                     // process alive
	stateExited                      // process ended
	stateFailedStart                 // could not be started (waiting, with a reason)
)

// container: one container of a pod as a local process, with its probes.
type container struct {
	w       *podWorker
	spec    corev1.Container
	init    bool
	sidecar bool

	mu          sync.Mutex
	st          runState
	cmd         *exec.Cmd
	done        chan struct{} // closed when the current process exited
	stopProbes  chan struct{}
	startedAt   metav1.Time
	finishedAt  metav1.Time
	exitCode    int32
	exitReason  string
	exitMessage string // the end of the log (FallbackToLogsOnError)
	restarts    int32
	lastTerm    *corev1.ContainerStateTerminated // the previous run, after a restart
	started     bool                             // startup probe passed (or none)
	ready       bool
	waitReason  string
	waitMessage string
	nextStart   time.Time
	stopping    bool
}

func (c *container) state() runState {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.st
}

func (c *container) exit() (runState, int32) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.st, c.exitCode
}

func (c *container) isStarted() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.st == stateRunning && c.started
}

func imageRepo(image string) string {
	if i := strings.Index(image, "@"); i >= 0 {
		image = image[:i]
	}
	if i := strings.LastIndex(image, ":"); i > strings.LastIndex(image, "/") {
		image = image[:i]
	}
	return image
}

// argv: what the container runs. The fal-sidecar image runs the workspace's binary;
// other images run command + args (or the --image-command stand-in for the image's
// entrypoint when there is no command).
func (c *container) argv(vars map[string]string) ([]string, error) {
	cfg := c.w.k.cfg
	repo := imageRepo(c.spec.Image)
	var argv []string
	switch {
	case filepath.Base(repo) == cfg.sidecarRepo:
		argv = []string{cfg.sidecarBin}
		if len(c.spec.Command) > 1 {
			argv = append(argv, c.spec.Command[1:]...)
		}
	case len(c.spec.Command) > 0:
		argv = append(argv, c.spec.Command...)
	case cfg.imageCommand[repo] != nil:
		argv = append(argv, cfg.imageCommand[repo]...)
	default:
		return nil, fmt.Errorf("image %s has no local command: give the container a command, or start test-kubelet with --image-command %s=CMD", c.spec.Image, repo)
	}
	argv = append(argv, c.spec.Args...)
	for i := range argv {
		argv[i] = expand(argv[i], vars)
	}
	return argv, nil
}

func (c *container) helperSpec(argv, env []string) helperSpec {
	w := c.w
	spec := helperSpec{Netns: w.netns, Dir: c.spec.WorkingDir, Argv: argv, Env: env}
	if spec.Dir == "" {
		spec.ImageDir = w.k.cfg.workDir
	}
	for _, m := range c.spec.VolumeMounts {
		src, ok := w.volumes[m.Name]
		if !ok {
			continue
		}
		if m.SubPath != "" {
			src = filepath.Join(src, m.SubPath)
			_ = os.MkdirAll(src, 0o777)
		}
		spec.Binds = append(spec.Binds, bind{Src: src, Dst: m.MountPath, ReadOnly: m.ReadOnly})
	}
	if w.resolvConf != "" {
		spec.Binds = append(spec.Binds, bind{Src: w.resolvConf, Dst: "/etc/resolv.conf", File: true})
	}
	return spec
}

// start launches the process (or records why it cannot start).
func (c *container) start() {
	w := c.w
	ctx := context.Background()
	fail := func(reason string, err error) {
		c.mu.Lock()
		c.st, c.waitReason, c.waitMessage = stateFailedStart, reason, err.Error()
		c.nextStart = time.Now().Add(10 * time.Second)
		c.mu.Unlock()
		klog.Warningf("pod %s container %s: %s: %v", w.key(), c.spec.Name, reason, err)
		w.notify()
	}
	env, vars, err := w.environment(ctx, c.spec)
	if err != nil {
		fail("CreateContainerConfigError", err)
		return
	}
	argv, err := c.argv(vars)
	if err != nil {
		fail("ErrImageNeverPull", err)
		return
	}
	spec := c.helperSpec(argv, env)
	cmd, err := helperCmd(spec)
	if err != nil {
		fail("CreateContainerError", err)
		return
	}
	mounts := w.k.mounts
	var targets []string
	releaseMounts := func() {
		for _, t := range targets {
			mounts.release(t)
		}
	}
	for _, b := range spec.Binds {
		if b.File {
			continue // an existing file of the host: nothing to create or remove
		}
		if err := mounts.acquire(b.Dst); err != nil {
			releaseMounts()
			fail("CreateContainerError", err)
			return
		}
		targets = append(targets, b.Dst)
	}
	_ = os.Remove(exitedMarker(w.dir, c.spec.Name))
	logf, err := os.OpenFile(filepath.Join(w.dir, "logs", c.spec.Name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		releaseMounts()
		fail("CreateContainerError", err)
		return
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		releaseMounts()
		fail("StartError", err)
		return
	}
	logf.Close()
	done := make(chan struct{})
	stopProbes := make(chan struct{})
	c.mu.Lock()
	if c.st == stateExited {
		c.lastTerm = &corev1.ContainerStateTerminated{ExitCode: c.exitCode, Reason: c.exitReason,
			StartedAt: c.startedAt, FinishedAt: c.finishedAt}
	}
	c.cmd, c.done, c.stopProbes = cmd, done, stopProbes
	c.st, c.startedAt = stateRunning, metav1.Now()
	c.started = c.spec.StartupProbe == nil
	c.ready = false
	c.waitReason, c.waitMessage = "", ""
	c.mu.Unlock()
	klog.Infof("pod %s container %s: started pid %d: %s", w.key(), c.spec.Name, cmd.Process.Pid, strings.Join(argv, " "))
	go func() {
		err := cmd.Wait()
		releaseMounts()
		code := int32(0)
		reason := "Completed"
		if err != nil {
			reason = "Error"
			code = 1
			if ee, ok := err.(*exec.ExitError); ok {
				if ws, ok := ee.Sys().(syscall.WaitStatus); ok {
					switch {
					case ws.Signaled():
						code = 128 + int32(ws.Signal())
					default:
						code = int32(ws.ExitStatus())
					}
				}
			}
			if code == 0 {
				code = 1
			}
		}
		close(stopProbes)
		// A followed log (`kubectl logs -f`) ends here, as the kubelet's does.
		_ = os.WriteFile(exitedMarker(w.dir, c.spec.Name), nil, 0o644)
		message := ""
		if code != 0 && c.spec.TerminationMessagePolicy == corev1.TerminationMessageFallbackToLogsOnError {
			message = logTail(filepath.Join(w.dir, "logs", c.spec.Name+".log"))
		}
		c.mu.Lock()
		c.st, c.exitCode, c.exitReason, c.finishedAt = stateExited, code, reason, metav1.Now()
		c.exitMessage = message
		c.ready = false
		backoff := time.Duration(1<<min(int(c.restarts), 5)) * time.Second // 1 s … 32 s
		c.nextStart = time.Now().Add(backoff)
		c.mu.Unlock()
		close(done)
		klog.Infof("pod %s container %s: exited %d", w.key(), c.spec.Name, code)
		w.notify()
	}()
	go c.probe(stopProbes)
	w.notify()
}

// restartAfterBackoff starts the container again once its backoff has passed.
func (c *container) restartAfterBackoff() {
	c.mu.Lock()
	due := time.Now().After(c.nextStart) && !c.stopping
	if due {
		c.restarts++
	}
	c.mu.Unlock()
	if due {
		c.start()
	}
}

func (c *container) signal(sig syscall.Signal) {
	c.mu.Lock()
	cmd := c.cmd
	running := c.st == stateRunning
	c.mu.Unlock()
	if cmd != nil && running {
		_ = syscall.Kill(-cmd.Process.Pid, sig) // the process group
	}
}

func (c *container) kill() {
	c.signal(syscall.SIGKILL)
	c.mu.Lock()
	done := c.done
	c.mu.Unlock()
	if done != nil {
		select {
		case <-done:
		case <-time.After(5 * time.Second):
		}
	}
}

// stop ends the container for good (the pod is going away): no more restarts.
func (c *container) stop(deadline time.Time, graceful bool) {
	c.mu.Lock()
	c.stopping = true
	c.mu.Unlock()
	c.terminate(deadline, graceful)
}

// terminate: the preStop hook (if graceful), SIGTERM, SIGKILL at the deadline. After a
// failed liveness or startup probe the restart policy then starts it again.
func (c *container) terminate(deadline time.Time, graceful bool) {
	c.mu.Lock()
	running, done := c.st == stateRunning, c.done
	c.mu.Unlock()
	if !running {
		return
	}
	if graceful && c.spec.Lifecycle != nil && c.spec.Lifecycle.PreStop != nil {
		ctx, cancel := context.WithDeadline(context.Background(), deadline)
		go func() { // a force deletion or a kubelet shutdown cuts the hook short
			select {
			case <-c.w.gone:
				cancel()
			case <-ctx.Done():
			}
		}()
		t0 := time.Now()
		err := c.runHandler(ctx, c.spec.Lifecycle.PreStop)
		cancel()
		if err != nil {
			klog.Warningf("pod %s container %s: preStop: %v", c.w.key(), c.spec.Name, err)
		} else {
			klog.Infof("pod %s container %s: preStop hook done in %v", c.w.key(), c.spec.Name, time.Since(t0).Round(time.Millisecond))
		}
	}
	if graceful {
		c.signal(syscall.SIGTERM)
		select {
		case <-done:
			return
		case <-time.After(time.Until(deadline)):
		case <-c.w.gone:
		}
	}
	c.kill()
}

// port resolves a probe or hook port (a number or a container port name).
func (c *container) port(p intstr.IntOrString) (int, error) {
	if p.Type == intstr.Int {
		return p.IntValue(), nil
	}
	for _, cp := range c.spec.Ports {
		if cp.Name == p.StrVal {
			return int(cp.ContainerPort), nil
		}
	}
	if n, err := strconv.Atoi(p.StrVal); err == nil {
		return n, nil
	}
	return 0, fmt.Errorf("no container port named %q", p.StrVal)
}

// runHandler runs a probe or hook action: HTTP GET or TCP connect to the pod's
// address (as the kubelet does, from outside the pod), or a command in the pod.
func (c *container) runHandler(ctx context.Context, h *corev1.LifecycleHandler) error {
	return c.action(ctx, h.HTTPGet, h.TCPSocket, h.Exec)
}

func (c *container) action(ctx context.Context, get *corev1.HTTPGetAction, tcp *corev1.TCPSocketAction, ex *corev1.ExecAction) error {
	switch {
	case get != nil:
		port, err := c.port(get.Port)
		if err != nil {
			return err
		}
		host := get.Host
		if host == "" {
			host = c.w.ip
		}
		scheme := "http"
		if get.Scheme == corev1.URISchemeHTTPS {
			scheme = "https"
		}
		path := get.Path
		if !strings.HasPrefix(path, "/") {
			path = "/" + path
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet,
			fmt.Sprintf("%s://%s%s", scheme, net.JoinHostPort(host, strconv.Itoa(port)), path), nil)
		if err != nil {
			return err
		}
		req.Header.Set("User-Agent", "kube-probe/test-kubelet")
		for _, h := range get.HTTPHeaders {
			req.Header.Set(h.Name, h.Value)
		}
		client := &http.Client{
			Transport:     &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, DisableKeepAlives: true},
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		}
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode < 200 || resp.StatusCode >= 400 {
			return fmt.Errorf("HTTP %d", resp.StatusCode)
		}
		return nil
	case tcp != nil:
		port, err := c.port(tcp.Port)
		if err != nil {
			return err
		}
		host := tcp.Host
		if host == "" {
			host = c.w.ip
		}
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(host, strconv.Itoa(port)))
		if err != nil {
			return err
		}
		return conn.Close()
	case ex != nil:
		env, _, err := c.w.environment(ctx, c.spec)
		if err != nil {
			return err
		}
		cmd, err := helperCmd(c.helperSpec(ex.Command, env))
		if err != nil {
			return err
		}
		if err := cmd.Start(); err != nil {
			return err
		}
		errc := make(chan error, 1)
		go func() { errc <- cmd.Wait() }()
		select {
		case err := <-errc:
			return err
		case <-ctx.Done():
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-errc
			return ctx.Err()
		}
	}
	return fmt.Errorf("no action")
}

type prober struct {
	p        *corev1.Probe
	next     time.Time
	ok, fail int32
}

func newProber(p *corev1.Probe, start time.Time) *prober {
	if p == nil {
		return nil
	}
	return &prober{p: p, next: start.Add(time.Duration(p.InitialDelaySeconds) * time.Second)}
}

func (pr *prober) period() time.Duration {
	if pr.p.PeriodSeconds > 0 {
		return time.Duration(pr.p.PeriodSeconds) * time.Second
	}
	return 10 * time.Second
}

// run probes once if due; returns (ran, success-threshold reached, failure-threshold reached).
func (pr *prober) run(c *container) (bool, bool, bool) {
	if pr == nil || time.Now().Before(pr.next) {
		return false, false, false
	}
	timeout := time.Second
	if pr.p.TimeoutSeconds > 0 {
		timeout = time.Duration(pr.p.TimeoutSeconds) * time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	err := c.action(ctx, pr.p.HTTPGet, pr.p.TCPSocket, pr.p.Exec)
	cancel()
	pr.next = time.Now().Add(pr.period())
	success, failure := max(pr.p.SuccessThreshold, 1), pr.p.FailureThreshold
	if failure <= 0 {
		failure = 3
	}
	if err == nil {
		pr.ok, pr.fail = pr.ok+1, 0
	} else {
		pr.ok, pr.fail = 0, pr.fail+1
	}
	return true, pr.ok >= success, pr.fail >= failure
}

// probe runs the startup, readiness and liveness probes of one process until it exits.
func (c *container) probe(stop chan struct{}) {
	now := time.Now()
	startup := newProber(c.spec.StartupProbe, now)
	readiness := newProber(c.spec.ReadinessProbe, now)
	liveness := newProber(c.spec.LivenessProbe, now)
	restart := func(why string) {
		klog.Infof("pod %s container %s: %s probe failed, restarting", c.w.key(), c.spec.Name, why)
		go c.terminate(time.Now().Add(graceOf(c.w.latest())), true)
	}
	for {
		select {
		case <-stop:
			return
		case <-time.After(100 * time.Millisecond):
		}
		c.mu.Lock()
		started, stopping := c.started, c.stopping
		c.mu.Unlock()
		if !started {
			if stopping {
				continue
			}
			if ran, ok, failed := startup.run(c); ran {
				if ok {
					c.mu.Lock()
					c.started = true
					c.mu.Unlock()
					c.w.notify()
					if readiness != nil {
						readiness.next = time.Now()
					}
				} else if failed {
					restart("startup")
					return
				}
			}
			continue
		}
		if readiness == nil {
			c.setReady(true)
		} else if ran, ok, failed := readiness.run(c); ran {
			if ok {
				c.setReady(true)
			} else if failed {
				c.setReady(false)
			}
		}
		// Readiness is probed on a stopping pod too (a draining sidecar turns unready);
		// liveness no longer restarts anything.
		if stopping {
			continue
		}
		if ran, _, failed := liveness.run(c); ran && failed {
			restart("liveness")
			return
		}
	}
}

func graceOf(pod *corev1.Pod) time.Duration {
	if pod.Spec.TerminationGracePeriodSeconds != nil {
		return time.Duration(*pod.Spec.TerminationGracePeriodSeconds) * time.Second
	}
	return 30 * time.Second
}

func (c *container) setReady(ready bool) {
	c.mu.Lock()
	changed := c.ready != ready && c.st == stateRunning
	if changed {
		c.ready = ready
	}
	c.mu.Unlock()
	if changed {
		c.w.notify()
	}
}

func (c *container) containerStatus() corev1.ContainerStatus {
	c.mu.Lock()
	defer c.mu.Unlock()
	cs := corev1.ContainerStatus{
		Name:         c.spec.Name,
		Image:        c.spec.Image,
		ImageID:      "local://" + imageRepo(c.spec.Image),
		RestartCount: c.restarts,
		Ready:        c.ready && c.st == stateRunning,
		Started:      new(bool),
	}
	*cs.Started = c.st == stateRunning && c.started
	if c.lastTerm != nil {
		cs.LastTerminationState.Terminated = c.lastTerm.DeepCopy()
	}
	if c.cmd != nil && c.cmd.Process != nil {
		cs.ContainerID = fmt.Sprintf("local://%d", c.cmd.Process.Pid)
	}
	switch c.st {
	case stateNone:
		cs.State.Waiting = &corev1.ContainerStateWaiting{Reason: "PodInitializing"}
	case stateFailedStart:
		cs.State.Waiting = &corev1.ContainerStateWaiting{Reason: c.waitReason, Message: c.waitMessage}
	case stateRunning:
		cs.State.Running = &corev1.ContainerStateRunning{StartedAt: c.startedAt}
	case stateExited:
		cs.State.Terminated = &corev1.ContainerStateTerminated{
			ExitCode: c.exitCode, Reason: c.exitReason, Message: c.exitMessage,
			StartedAt: c.startedAt, FinishedAt: c.finishedAt,
		}
	}
	return cs
}

// logTail: what the kubelet's FallbackToLogsOnError puts in the termination message,
// the end of the container's log: at most 80 lines and 2048 bytes.
func logTail(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	const maxBytes, maxLines = 2048, 80
	size, _ := f.Seek(0, io.SeekEnd)
	start := max(size-maxBytes, 0)
	buf := make([]byte, size-start)
	if _, err := f.ReadAt(buf, start); err != nil && err != io.EOF {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(buf), "\n"), "\n")
	if start > 0 && len(lines) > 1 {
		lines = lines[1:] // a cut line
	}
	if len(lines) > maxLines {
		lines = lines[len(lines)-maxLines:]
	}
	return strings.Join(lines, "\n")
}

// exitedMarker: a file that exists while the container's process has exited (the log
// API ends a follow there).
func exitedMarker(podDir, container string) string {
	return filepath.Join(podDir, "logs", container+".exited")
}
