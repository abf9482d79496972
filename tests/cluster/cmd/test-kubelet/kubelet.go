package main

import (
	"context"
	"fmt"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"
	"k8s.io/utils/ptr"
)

// kubelet watches the pods bound to this node and keeps one worker per pod.
type kubelet struct {
	client  kubernetes.Interface
	cfg     config
	net     *podNetwork
	mu      sync.Mutex
	workers map[types.UID]*podWorker
	wg      sync.WaitGroup
	mounts  *mountPoints
	// Every Service of the cluster: the containers' Service environment.
	services corelisters.ServiceLister
}

func newKubelet(client kubernetes.Interface, cfg config, net *podNetwork) *kubelet {
	return &kubelet{client: client, cfg: cfg, net: net, workers: map[types.UID]*podWorker{}, mounts: newMountPoints()}
}

func (k *kubelet) run(ctx context.Context) error {
	// Services first, as the kubelet does: a container must not start with a partial
	// Service environment.
	svcFactory := informers.NewSharedInformerFactory(k.client, 0)
	k.services = svcFactory.Core().V1().Services().Lister()
	svcFactory.Start(ctx.Done())
	defer svcFactory.Shutdown()
	for typ, ok := range svcFactory.WaitForCacheSync(ctx.Done()) {
		if !ok {
			return fmt.Errorf("informer of %v did not sync", typ)
		}
	}
	factory := informers.NewSharedInformerFactoryWithOptions(k.client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", k.cfg.nodeName).String()
		}))
	informer := factory.Core().V1().Pods().Informer()
	_, err := informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { k.sync(ctx, obj.(*corev1.Pod)) },
		UpdateFunc: func(_, obj any) { k.sync(ctx, obj.(*corev1.Pod)) },
		DeleteFunc: func(obj any) {
			if tomb, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = tomb.Obj
			}
			if pod, ok := obj.(*corev1.Pod); ok {
				k.gone(pod)
			}
		},
	})
	if err != nil {
		return err
	}
	factory.Start(ctx.Done())
	klog.Infof("test-kubelet: node %s ready, pod network %s.0/24", k.cfg.nodeName, k.cfg.subnet)
	<-ctx.Done()
	factory.Shutdown()
	return nil
}

func (k *kubelet) sync(ctx context.Context, pod *corev1.Pod) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if w, ok := k.workers[pod.UID]; ok {
		w.update(pod)
		return
	}
	terminal := pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed
	if pod.DeletionTimestamp != nil {
		// Nothing of it runs here (e.g. it was bound before this kubelet started).
		go k.deletePod(context.Background(), pod)
		return
	}
	if terminal {
		return
	}
	w := newPodWorker(k, pod)
	k.workers[pod.UID] = w
	k.wg.Add(1)
	go func() {
		defer k.wg.Done()
		w.run(ctx)
		k.mu.Lock()
		delete(k.workers, pod.UID)
		k.mu.Unlock()
	}()
}

// gone: the pod object was removed (force deletion or after our own final delete).
func (k *kubelet) gone(pod *corev1.Pod) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if w, ok := k.workers[pod.UID]; ok {
		w.removed()
	}
}

// deletePod removes a pod whose containers have all stopped (what the kubelet does
// at the end of graceful termination).
func (k *kubelet) deletePod(ctx context.Context, pod *corev1.Pod) {
	err := k.client.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{
		GracePeriodSeconds: ptr.To[int64](0),
		Preconditions:      &metav1.Preconditions{UID: ptr.To(pod.UID)},
	})
	if err != nil {
		klog.V(2).Infof("final delete of %s/%s: %v", pod.Namespace, pod.Name, err)
	}
}

// shutdown stops every pod (the kubelet is going away): SIGTERM, a short wait, SIGKILL.
func (k *kubelet) shutdown() {
	k.mu.Lock()
	for _, w := range k.workers {
		w.removed()
	}
	k.mu.Unlock()
	done := make(chan struct{})
	go func() { k.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		klog.Warning("test-kubelet: pods still stopping at shutdown")
	}
}
