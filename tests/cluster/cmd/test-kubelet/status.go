package main

import (
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// status computes the pod status from the containers (what `kubectl get pods` shows).
func (w *podWorker) status(cur *corev1.Pod) corev1.PodStatus {
	st := corev1.PodStatus{
		QOSClass:  cur.Status.QOSClass,
		StartTime: &w.started,
		HostIP:    w.k.net.nodeIP(),
		HostIPs:   []corev1.HostIP{{IP: w.k.net.nodeIP()}},
	}
	if w.ip != "" {
		st.PodIP = w.ip
		st.PodIPs = []corev1.PodIP{{IP: w.ip}}
	}
	allReady, anyRunning, allExited, anyFailed := true, false, true, false
	for _, c := range w.ctrs {
		cs := c.containerStatus()
		if c.init {
			st.InitContainerStatuses = append(st.InitContainerStatuses, cs)
			if c.sidecar && !cs.Ready {
				allReady = false
			}
			continue
		}
		st.ContainerStatuses = append(st.ContainerStatuses, cs)
		if !cs.Ready {
			allReady = false
		}
		if cs.State.Running != nil {
			anyRunning = true
		}
		if cs.State.Terminated == nil {
			allExited = false
		} else if cs.State.Terminated.ExitCode != 0 {
			anyFailed = true
		}
	}
	switch {
	case w.sandbox != "":
		st.Phase = corev1.PodPending
		st.Message = w.sandbox
		st.Reason = "SandboxFailed"
	case !w.initDone:
		st.Phase = corev1.PodPending
	case allExited && w.restartPolicy() == corev1.RestartPolicyNever && !anyFailed:
		st.Phase = corev1.PodSucceeded
	case allExited && w.restartPolicy() != corev1.RestartPolicyAlways && anyFailed:
		st.Phase = corev1.PodFailed
	case anyRunning || w.initDone:
		st.Phase = corev1.PodRunning
	}
	cond := func(t corev1.PodConditionType, ok bool) {
		status := corev1.ConditionFalse
		if ok {
			status = corev1.ConditionTrue
		}
		c := corev1.PodCondition{Type: t, Status: status, LastTransitionTime: metav1.Now()}
		for _, old := range cur.Status.Conditions {
			if old.Type == t && old.Status == status {
				c.LastTransitionTime = old.LastTransitionTime
			}
		}
		st.Conditions = append(st.Conditions, c)
	}
	cond(corev1.PodReadyToStartContainers, w.netns != "")
	cond(corev1.PodInitialized, w.initDone)
	cond(corev1.ContainersReady, w.initDone && allReady)
	cond(corev1.PodReady, w.initDone && allReady)
	for _, old := range cur.Status.Conditions {
		if old.Type == corev1.PodScheduled {
			st.Conditions = append(st.Conditions, old)
		}
	}
	return st
}
