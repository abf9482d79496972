package main

import (
	"context"
	"os"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"
	"k8s.io/utils/ptr"
)

const leaseSeconds = 40

// nodeAgent keeps the Node object and its Lease alive (what the node lifecycle
// controller of kube-controller-manager watches).
type nodeAgent struct {
	client kubernetes.Interface
	cfg    config
	ip     string
}

func (n *nodeAgent) resources() corev1.ResourceList {
	list := corev1.ResourceList{}
	for k, v := range n.cfg.capacity {
		list[corev1.ResourceName(k)] = resource.MustParse(v)
	}
	return list
}

func (n *nodeAgent) status() corev1.NodeStatus {
	now := metav1.Now()
	hostname, _ := os.Hostname()
	return corev1.NodeStatus{
		Capacity:    n.resources(),
		Allocatable: n.resources(),
		Phase:       corev1.NodeRunning,
		Conditions: []corev1.NodeCondition{
			{Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady",
				Message: "test-kubelet is posting ready status", LastHeartbeatTime: now, LastTransitionTime: now},
			{Type: corev1.NodeMemoryPressure, Status: corev1.ConditionFalse, Reason: "KubeletHasSufficientMemory", LastHeartbeatTime: now, LastTransitionTime: now},
			{Type: corev1.NodeDiskPressure, Status: corev1.ConditionFalse, Reason: "KubeletHasNoDiskPressure", LastHeartbeatTime: now, LastTransitionTime: now},
			{Type: corev1.NodePIDPressure, Status: corev1.ConditionFalse, Reason: "KubeletHasSufficientPID", LastHeartbeatTime: now, LastTransitionTime: now},
		},
		Addresses: []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: n.ip},
			{Type: corev1.NodeHostName, Address: hostname},
		},
		DaemonEndpoints: corev1.NodeDaemonEndpoints{
			KubeletEndpoint: corev1.DaemonEndpoint{Port: int32(n.cfg.port)},
		},
		NodeInfo: corev1.NodeSystemInfo{
			KubeletVersion:          "test-kubelet",
			ContainerRuntimeVersion: "local-process://0",
			OperatingSystem:         "linux",
			Architecture:            "amd64",
		},
	}
}

func (n *nodeAgent) register(ctx context.Context) error {
	labels := map[string]string{
		"kubernetes.io/hostname": n.cfg.nodeName,
		"kubernetes.io/os":       "linux",
		"kubernetes.io/arch":     "amd64",
	}
	for k, v := range n.cfg.labels {
		labels[k] = v
	}
	nodes := n.client.CoreV1().Nodes()
	node, err := nodes.Get(ctx, n.cfg.nodeName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		node, err = nodes.Create(ctx, &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: n.cfg.nodeName, Labels: labels},
		}, metav1.CreateOptions{})
	}
	if err != nil {
		return err
	}
	if node.Labels == nil {
		node.Labels = map[string]string{}
	}
	for k, v := range labels {
		node.Labels[k] = v
	}
	node.Spec.Unschedulable = false
	if node, err = nodes.Update(ctx, node, metav1.UpdateOptions{}); err != nil {
		return err
	}
	if err := n.postStatus(ctx); err != nil {
		return err
	}
	return n.renewLease(ctx, node)
}

func (n *nodeAgent) postStatus(ctx context.Context) error {
	nodes := n.client.CoreV1().Nodes()
	node, err := nodes.Get(ctx, n.cfg.nodeName, metav1.GetOptions{})
	if err != nil {
		return err
	}
	st := n.status()
	// Keep lastTransitionTime of conditions that did not change.
	for i, c := range st.Conditions {
		for _, old := range node.Status.Conditions {
			if old.Type == c.Type && old.Status == c.Status {
				st.Conditions[i].LastTransitionTime = old.LastTransitionTime
			}
		}
	}
	node.Status = st
	_, err = nodes.UpdateStatus(ctx, node, metav1.UpdateOptions{})
	return err
}

func (n *nodeAgent) renewLease(ctx context.Context, node *corev1.Node) error {
	leases := n.client.CoordinationV1().Leases(corev1.NamespaceNodeLease)
	now := metav1.NewMicroTime(time.Now())
	lease, err := leases.Get(ctx, n.cfg.nodeName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		_, err = leases.Create(ctx, &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{
				Name: n.cfg.nodeName, Namespace: corev1.NamespaceNodeLease,
				OwnerReferences: []metav1.OwnerReference{{
					APIVersion: "v1", Kind: "Node", Name: node.Name, UID: node.UID,
				}},
			},
			Spec: coordinationv1.LeaseSpec{
				HolderIdentity:       ptr.To(n.cfg.nodeName),
				LeaseDurationSeconds: ptr.To[int32](leaseSeconds),
				RenewTime:            &now,
			},
		}, metav1.CreateOptions{})
		return err
	}
	if err != nil {
		return err
	}
	lease.Spec.RenewTime = &now
	lease.Spec.HolderIdentity = ptr.To(n.cfg.nodeName)
	lease.Spec.LeaseDurationSeconds = ptr.To[int32](leaseSeconds)
	_, err = leases.Update(ctx, lease, metav1.UpdateOptions{})
	return err
}

// heartbeat renews the Lease every 10 s and posts node status every 30 s.
func (n *nodeAgent) heartbeat(ctx context.Context) {
	tick := time.NewTicker(10 * time.Second)
	defer tick.Stop()
	for i := 1; ; i++ {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		node, err := n.client.CoreV1().Nodes().Get(ctx, n.cfg.nodeName, metav1.GetOptions{})
		if err == nil {
			err = n.renewLease(ctx, node)
		}
		if err == nil && i%3 == 0 {
			err = n.postStatus(ctx)
		}
		if err != nil && ctx.Err() == nil {
			klog.Warningf("node heartbeat: %v", err)
		}
	}
}
