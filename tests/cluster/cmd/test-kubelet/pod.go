package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/klog/v2"
)

// podWorker runs one pod: sandbox (netns + volumes), init containers, native
// sidecars, app containers, status, and graceful termination.
type podWorker struct {
	k          *kubelet
	mu         sync.Mutex
	pod        *corev1.Pod // the object the pod started from (spec is immutable); not written again
	current    *corev1.Pod // the latest object seen (deletion fields), under mu
	dir        string
	netns      string
	ip         string
	volumes    map[string]string // volume name → host directory
	resolvConf string            // the pod's resolv.conf ("": the host's)
	ctrs       []*container      // init containers (in order), then app containers
	started    metav1.Time
	initDone   bool
	sandbox    string // sandbox error, if any

	changed  chan struct{} // status may have changed
	deleting chan struct{} // deletionTimestamp seen
	gone     chan struct{} // object removed: kill now
	delOnce  sync.Once
	goneOnce sync.Once
	last     *corev1.PodStatus
}

func newPodWorker(k *kubelet, pod *corev1.Pod) *podWorker {
	w := &podWorker{
		k: k, pod: pod.DeepCopy(),
		dir:      filepath.Join(k.cfg.stateDir, "pods", fmt.Sprintf("%s_%s_%s", pod.Namespace, pod.Name, pod.UID)),
		changed:  make(chan struct{}, 1),
		deleting: make(chan struct{}),
		gone:     make(chan struct{}),
		started:  metav1.Now(),
	}
	for i := range pod.Spec.InitContainers {
		c := pod.Spec.InitContainers[i]
		w.ctrs = append(w.ctrs, &container{w: w, spec: c, init: true,
			sidecar: c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways})
	}
	for i := range pod.Spec.Containers {
		w.ctrs = append(w.ctrs, &container{w: w, spec: pod.Spec.Containers[i]})
	}
	return w
}

func (w *podWorker) key() string { return w.pod.Namespace + "/" + w.pod.Name }

func (w *podWorker) notify() {
	select {
	case w.changed <- struct{}{}:
	default:
	}
}

func (w *podWorker) update(pod *corev1.Pod) {
	w.mu.Lock()
	w.current = pod.DeepCopy()
	w.mu.Unlock()
	if pod.DeletionTimestamp != nil {
		w.delOnce.Do(func() { close(w.deleting) })
	}
}

func (w *podWorker) removed() {
	w.goneOnce.Do(func() { close(w.gone) })
}

func (w *podWorker) latest() *corev1.Pod {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.current != nil {
		return w.current.DeepCopy()
	}
	return w.pod.DeepCopy()
}

func (w *podWorker) restartPolicy() corev1.RestartPolicy {
	if w.pod.Spec.RestartPolicy == "" {
		return corev1.RestartPolicyAlways
	}
	return w.pod.Spec.RestartPolicy
}

// stopping reports whether the pod is being torn down.
func (w *podWorker) stopping() bool {
	select {
	case <-w.deleting:
		return true
	case <-w.gone:
		return true
	default:
		return false
	}
}

func (w *podWorker) run(ctx context.Context) {
	klog.Infof("pod %s: starting", w.key())
	defer w.cleanup()
	// A failed setup (a ConfigMap or claim missing, the network full) is retried, as
	// the kubelet retries mounting volumes; the pod shows why meanwhile.
	for {
		err := w.setup(ctx)
		if err == nil {
			w.sandbox = ""
			break
		}
		if w.sandbox != err.Error() {
			klog.Errorf("pod %s: sandbox: %v", w.key(), err)
		}
		w.sandbox = err.Error()
		w.publish(ctx)
		select {
		case <-w.deleting:
			w.k.deletePod(ctx, w.latest())
			return
		case <-w.gone:
			return
		case <-ctx.Done():
			return
		case <-time.After(time.Second):
		}
	}
	w.publish(ctx)
	if w.startContainers(ctx) {
		w.publish(ctx)
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
	loop:
		for {
			select {
			case <-ctx.Done():
				break loop
			case <-w.gone:
				break loop
			case <-w.deleting:
				break loop
			case <-w.changed:
				w.publish(ctx)
			case <-tick.C:
				w.restartExited()
				w.publish(ctx)
			}
		}
	}
	w.terminate(ctx)
}

// startContainers: init containers one after another (a native sidecar only has to
// have started), then every app container. False if the pod stopped meanwhile.
func (w *podWorker) startContainers(ctx context.Context) bool {
	for _, c := range w.ctrs {
		if !c.init {
			continue
		}
		for {
			if w.stopping() || ctx.Err() != nil {
				return false
			}
			if c.sidecar {
				if c.state() == stateNone {
					c.start()
					w.publish(ctx)
				}
				if c.isStarted() {
					break
				}
				w.restartExited()
			} else {
				switch st, code := c.exit(); {
				case st == stateNone:
					c.start()
					w.publish(ctx)
				case st == stateExited && code == 0:
				case st == stateFailedStart:
					c.restartAfterBackoff()
				case st == stateExited && w.restartPolicy() != corev1.RestartPolicyNever:
					c.restartAfterBackoff()
				case st == stateExited:
					w.publish(ctx) // Failed
					return false
				}
				if st, code := c.exit(); st == stateExited && code == 0 {
					break
				}
			}
			select {
			case <-w.changed:
				w.publish(ctx)
			case <-time.After(200 * time.Millisecond):
			}
		}
	}
	w.initDone = true
	for _, c := range w.ctrs {
		if !c.init {
			c.start()
		}
	}
	return true
}

// restartExited applies the restart policy (sidecars always restart).
func (w *podWorker) restartExited() {
	if w.stopping() {
		return
	}
	for _, c := range w.ctrs {
		st, code := c.exit()
		if st != stateExited && st != stateFailedStart {
			continue
		}
		switch {
		case c.sidecar:
		case c.init:
			continue // init containers are handled by startContainers
		case w.restartPolicy() == corev1.RestartPolicyNever:
			continue
		case w.restartPolicy() == corev1.RestartPolicyOnFailure && code == 0 && st == stateExited:
			continue
		}
		c.restartAfterBackoff()
	}
}

// terminate: preStop hooks and SIGTERM for the app containers, then the sidecars in
// reverse order, SIGKILL at the end of the grace period; then the final delete.
func (w *podWorker) terminate(ctx context.Context) {
	pod := w.latest()
	grace := int64(30)
	if pod.Spec.TerminationGracePeriodSeconds != nil {
		grace = *pod.Spec.TerminationGracePeriodSeconds
	}
	if pod.DeletionGracePeriodSeconds != nil {
		grace = *pod.DeletionGracePeriodSeconds
	}
	hard := isClosed(w.gone) || ctx.Err() != nil
	if hard {
		grace = 2
	}
	deadline := time.Now().Add(time.Duration(grace) * time.Second)
	klog.Infof("pod %s: stopping (grace %ds)", w.key(), grace)
	var wg sync.WaitGroup
	for _, c := range w.ctrs {
		if c.init {
			continue
		}
		wg.Add(1)
		go func() { defer wg.Done(); c.stop(deadline, !hard) }()
	}
	wg.Wait()
	if !hard {
		w.publish(ctx)
	}
	for i := len(w.ctrs) - 1; i >= 0; i-- {
		if c := w.ctrs[i]; c.init {
			// A sidecar gets what is left of the grace period, at least 2 s.
			d := deadline
			if min := time.Now().Add(2 * time.Second); d.Before(min) {
				d = min
			}
			c.stop(d, !hard)
		}
	}
	if !hard {
		w.publish(ctx)
		w.k.deletePod(ctx, pod)
	}
	klog.Infof("pod %s: stopped", w.key())
}

func isClosed(ch chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func (w *podWorker) cleanup() {
	for _, c := range w.ctrs {
		c.kill()
	}
	if w.netns != "" {
		w.k.net.remove(w.netns, w.ip)
	}
	if os.Getenv("TEST_KUBELET_KEEP_PODS") == "" {
		_ = os.RemoveAll(filepath.Join(w.dir, "volumes"))
	}
}

// publish writes the pod's status when it changed.
func (w *podWorker) publish(ctx context.Context) {
	pods := w.k.client.CoreV1().Pods(w.pod.Namespace)
	for attempt := 0; attempt < 5; attempt++ {
		cur, err := pods.Get(ctx, w.pod.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) || ctx.Err() != nil {
			return
		}
		if err != nil || cur.UID != w.pod.UID {
			return
		}
		st := w.status(cur)
		if w.last != nil && reflect.DeepEqual(*w.last, st) {
			return
		}
		cur.Status = st
		_, err = pods.UpdateStatus(ctx, cur, metav1.UpdateOptions{})
		if err == nil {
			w.last = &st
			return
		}
		if !apierrors.IsConflict(err) {
			klog.Warningf("pod %s: status: %v", w.key(), err)
			return
		}
	}
}
