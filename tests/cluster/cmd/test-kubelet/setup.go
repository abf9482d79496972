package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/kubernetes/pkg/kubelet/envvars"
)

// setup creates the pod's network namespace, its volume directories and its
// resolv.conf. It is retried until it succeeds (a ConfigMap or a claim may not exist
// yet), so every step may run again.
func (w *podWorker) setup(ctx context.Context) error {
	if err := os.MkdirAll(filepath.Join(w.dir, "logs"), 0o755); err != nil {
		return err
	}
	if w.netns == "" {
		netns, ip, err := w.k.net.add(w.key())
		if err != nil {
			return err
		}
		w.netns, w.ip = netns, ip
	}
	resolv, err := w.writeResolvConf()
	if err != nil {
		return err
	}
	w.resolvConf = resolv
	w.volumes = map[string]string{}
	for _, v := range w.pod.Spec.Volumes {
		dir := filepath.Join(w.dir, "volumes", v.Name)
		switch {
		case v.HostPath != nil:
			w.volumes[v.Name] = v.HostPath.Path
			continue
		case v.PersistentVolumeClaim != nil:
			path, err := w.claimPath(ctx, v.PersistentVolumeClaim.ClaimName)
			if err != nil {
				return fmt.Errorf("volume %s: %w", v.Name, err)
			}
			w.volumes[v.Name] = path
			continue
		}
		if err := os.MkdirAll(dir, 0o777); err != nil {
			return err
		}
		w.volumes[v.Name] = dir
		files, err := w.volumeFiles(ctx, v)
		if err != nil {
			return fmt.Errorf("volume %s: %w", v.Name, err)
		}
		for name, data := range files {
			p := filepath.Join(dir, name)
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				return err
			}
			if err := os.WriteFile(p, data, 0o644); err != nil {
				return err
			}
		}
	}
	return nil
}

// claimPath: the directory of a bound claim's PersistentVolume. Only hostPath volumes
// (what the controller manager's hostPath provisioner makes) can be mounted here.
func (w *podWorker) claimPath(ctx context.Context, claim string) (string, error) {
	core := w.k.client.CoreV1()
	pvc, err := core.PersistentVolumeClaims(w.pod.Namespace).Get(ctx, claim, metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("claim %s: %w", claim, err)
	}
	if pvc.Status.Phase != corev1.ClaimBound || pvc.Spec.VolumeName == "" {
		return "", fmt.Errorf("claim %s is not bound (%s)", claim, pvc.Status.Phase)
	}
	pv, err := core.PersistentVolumes().Get(ctx, pvc.Spec.VolumeName, metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("volume %s of claim %s: %w", pvc.Spec.VolumeName, claim, err)
	}
	if pv.Spec.HostPath == nil {
		return "", fmt.Errorf("volume %s of claim %s is not a hostPath volume (the test kubelet mounts no other kind)", pv.Name, claim)
	}
	if _, err := os.Stat(pv.Spec.HostPath.Path); err != nil {
		return "", fmt.Errorf("volume %s of claim %s: %w", pv.Name, claim, err)
	}
	return pv.Spec.HostPath.Path, nil
}

// volumeFiles: the content of secret, configMap, downwardAPI and projected volumes
// (written once at pod start; emptyDir has none).
func (w *podWorker) volumeFiles(ctx context.Context, v corev1.Volume) (map[string][]byte, error) {
	files := map[string][]byte{}
	core := w.k.client.CoreV1()
	ns := w.pod.Namespace
	addItems := func(data map[string][]byte, items []corev1.KeyToPath, optional *bool, what string, err error) error {
		if err != nil {
			if optional != nil && *optional {
				return nil
			}
			return fmt.Errorf("%s: %w", what, err)
		}
		if len(items) == 0 {
			for k, d := range data {
				files[k] = d
			}
			return nil
		}
		for _, it := range items {
			if d, ok := data[it.Key]; ok {
				files[it.Path] = d
			}
		}
		return nil
	}
	secret := func(name string, items []corev1.KeyToPath, optional *bool) error {
		s, err := core.Secrets(ns).Get(ctx, name, metav1.GetOptions{})
		var data map[string][]byte
		if err == nil {
			data = s.Data
		}
		return addItems(data, items, optional, "secret "+name, err)
	}
	configMap := func(name string, items []corev1.KeyToPath, optional *bool) error {
		cm, err := core.ConfigMaps(ns).Get(ctx, name, metav1.GetOptions{})
		data := map[string][]byte{}
		if err == nil {
			for k, d := range cm.Data {
				data[k] = []byte(d)
			}
			for k, d := range cm.BinaryData {
				data[k] = d
			}
		}
		return addItems(data, items, optional, "configmap "+name, err)
	}
	downward := func(items []corev1.DownwardAPIVolumeFile) {
		for _, it := range items {
			if it.FieldRef != nil {
				files[it.Path] = []byte(w.fieldValue(it.FieldRef.FieldPath))
			}
		}
	}
	switch {
	case v.Secret != nil:
		return files, secret(v.Secret.SecretName, v.Secret.Items, v.Secret.Optional)
	case v.ConfigMap != nil:
		return files, configMap(v.ConfigMap.Name, v.ConfigMap.Items, v.ConfigMap.Optional)
	case v.DownwardAPI != nil:
		downward(v.DownwardAPI.Items)
	case v.Projected != nil:
		for _, src := range v.Projected.Sources {
			var err error
			switch {
			case src.Secret != nil:
				err = secret(src.Secret.Name, src.Secret.Items, src.Secret.Optional)
			case src.ConfigMap != nil:
				err = configMap(src.ConfigMap.Name, src.ConfigMap.Items, src.ConfigMap.Optional)
			case src.DownwardAPI != nil:
				downward(src.DownwardAPI.Items)
			case src.ServiceAccountToken != nil:
				var token string
				token, err = w.serviceAccountToken(ctx, src.ServiceAccountToken)
				files[src.ServiceAccountToken.Path] = []byte(token)
			}
			if err != nil {
				return nil, err
			}
		}
	}
	return files, nil
}

// serviceAccountToken requests a token bound to this pod (the projected
// kube-api-access volume), as the kubelet does.
func (w *podWorker) serviceAccountToken(ctx context.Context, p *corev1.ServiceAccountTokenProjection) (string, error) {
	sa := w.pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	req := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
		ExpirationSeconds: p.ExpirationSeconds,
		BoundObjectRef:    &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: w.pod.Name, UID: w.pod.UID},
	}}
	if p.Audience != "" {
		req.Spec.Audiences = []string{p.Audience}
	}
	tr, err := w.k.client.CoreV1().ServiceAccounts(w.pod.Namespace).CreateToken(ctx, sa, req, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("token for serviceaccount %s: %w", sa, err)
	}
	return tr.Status.Token, nil
}

var labelRef = regexp.MustCompile(`^metadata\.(labels|annotations)\['([^']+)'\]$`)

func (w *podWorker) fieldValue(path string) string {
	pod := w.pod
	switch path {
	case "metadata.name":
		return pod.Name
	case "metadata.namespace":
		return pod.Namespace
	case "metadata.uid":
		return string(pod.UID)
	case "spec.nodeName":
		return pod.Spec.NodeName
	case "spec.serviceAccountName":
		return pod.Spec.ServiceAccountName
	case "status.podIP":
		return w.ip
	case "status.hostIP":
		return w.k.net.nodeIP()
	case "metadata.labels", "metadata.annotations":
		m := pod.Labels
		if path == "metadata.annotations" {
			m = pod.Annotations
		}
		var lines []string
		for k, v := range m {
			lines = append(lines, fmt.Sprintf("%s=%q", k, v))
		}
		sort.Strings(lines)
		return strings.Join(lines, "\n")
	}
	if m := labelRef.FindStringSubmatch(path); m != nil {
		if m[1] == "labels" {
			return pod.Labels[m[2]]
		}
		return pod.Annotations[m[2]]
	}
	return ""
}

// serviceEnv: the Service environment of the pod's containers, as the kubelet's
// getServiceEnvVarMap makes it: the `kubernetes` Service of the default namespace
// always (KUBERNETES_SERVICE_HOST/PORT: in-cluster config), and with
// enableServiceLinks (the default) every Service of the pod's namespace that has a
// ClusterIP ({NAME}_SERVICE_HOST, {NAME}_PORT_…).
func (w *podWorker) serviceEnv() (map[string]string, error) {
	links := w.pod.Spec.EnableServiceLinks == nil || *w.pod.Spec.EnableServiceLinks
	all, err := w.k.services.List(labels.Everything())
	if err != nil {
		return nil, err
	}
	chosen := map[string]*corev1.Service{}
	for _, svc := range all {
		switch {
		case svc.Spec.ClusterIP == "" || svc.Spec.ClusterIP == corev1.ClusterIPNone:
		case svc.Namespace == metav1.NamespaceDefault && svc.Name == "kubernetes":
			if _, ok := chosen[svc.Name]; !ok {
				chosen[svc.Name] = svc
			}
		case svc.Namespace == w.pod.Namespace && links:
			chosen[svc.Name] = svc
		}
	}
	list := make([]*corev1.Service, 0, len(chosen))
	for _, svc := range chosen {
		list = append(list, svc)
	}
	env := map[string]string{}
	for _, e := range envvars.FromServices(list) {
		env[e.Name] = e.Value
	}
	return env, nil
}

// environment of a container: a minimal image environment (PATH, HOME from the
// host, then the image's --image-env), HOSTNAME, then envFrom and env in order, with $(VAR) references expanded
// (to them or the Service environment), then the Service variables not set otherwise.
func (w *podWorker) environment(ctx context.Context, c corev1.Container) ([]string, map[string]string, error) {
	core := w.k.client.CoreV1()
	ns := w.pod.Namespace
	svcEnv, err := w.serviceEnv()
	if err != nil {
		return nil, nil, err
	}
	vars := map[string]string{}
	var order []string
	set := func(k, v string) {
		if _, ok := vars[k]; !ok {
			order = append(order, k)
		}
		vars[k] = v
	}
	for _, k := range []string{"PATH", "HOME", "LANG"} {
		if v, ok := os.LookupEnv(k); ok {
			set(k, v)
		}
	}
	// What the image's config would set (--image-env), under the container's own env.
	for _, kv := range w.k.cfg.imageEnv[imageRepo(c.Image)] {
		set(kv[0], kv[1])
	}
	set("HOSTNAME", w.pod.Name)
	for _, from := range c.EnvFrom {
		switch {
		case from.ConfigMapRef != nil:
			cm, err := core.ConfigMaps(ns).Get(ctx, from.ConfigMapRef.Name, metav1.GetOptions{})
			if err != nil {
				if from.ConfigMapRef.Optional != nil && *from.ConfigMapRef.Optional {
					continue
				}
				return nil, nil, fmt.Errorf("envFrom configmap %s: %w", from.ConfigMapRef.Name, err)
			}
			for k, v := range cm.Data {
				set(from.Prefix+k, v)
			}
		case from.SecretRef != nil:
			s, err := core.Secrets(ns).Get(ctx, from.SecretRef.Name, metav1.GetOptions{})
			if err != nil {
				if from.SecretRef.Optional != nil && *from.SecretRef.Optional {
					continue
				}
				return nil, nil, fmt.Errorf("envFrom secret %s: %w", from.SecretRef.Name, err)
			}
			for k, v := range s.Data {
				set(from.Prefix+k, string(v))
			}
		}
	}
	for _, e := range c.Env {
		value := expand(e.Value, vars, svcEnv)
		if f := e.ValueFrom; f != nil {
			switch {
			case f.FieldRef != nil:
				value = w.fieldValue(f.FieldRef.FieldPath)
			case f.SecretKeyRef != nil:
				s, err := core.Secrets(ns).Get(ctx, f.SecretKeyRef.Name, metav1.GetOptions{})
				if err != nil || s.Data[f.SecretKeyRef.Key] == nil {
					if f.SecretKeyRef.Optional != nil && *f.SecretKeyRef.Optional {
						continue
					}
					return nil, nil, fmt.Errorf("env %s: secret %s key %s: %v", e.Name, f.SecretKeyRef.Name, f.SecretKeyRef.Key, err)
				}
				value = string(s.Data[f.SecretKeyRef.Key])
			case f.ConfigMapKeyRef != nil:
				cm, err := core.ConfigMaps(ns).Get(ctx, f.ConfigMapKeyRef.Name, metav1.GetOptions{})
				v, ok := "", false
				if err == nil {
					v, ok = cm.Data[f.ConfigMapKeyRef.Key]
				}
				if !ok {
					if f.ConfigMapKeyRef.Optional != nil && *f.ConfigMapKeyRef.Optional {
						continue
					}
					return nil, nil, fmt.Errorf("env %s: configmap %s key %s: %v", e.Name, f.ConfigMapKeyRef.Name, f.ConfigMapKeyRef.Key, err)
				}
				value = v
			}
		}
		set(e.Name, value)
	}
	svcNames := make([]string, 0, len(svcEnv))
	for k := range svcEnv {
		svcNames = append(svcNames, k)
	}
	sort.Strings(svcNames)
	for _, k := range svcNames {
		if _, ok := vars[k]; !ok {
			set(k, svcEnv[k])
		}
	}
	env := make([]string, 0, len(order))
	for _, k := range order {
		env = append(env, k+"="+vars[k])
	}
	return env, vars, nil
}

var varRef = regexp.MustCompile(`\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)`)

// expand replaces $(VAR) with defined variables (the first map that has it); $$
// escapes; undefined stay as is.
func expand(s string, vars ...map[string]string) string {
	return varRef.ReplaceAllStringFunc(s, func(m string) string {
		if m == "$$" {
			return "$"
		}
		for _, vs := range vars {
			if v, ok := vs[m[2:len(m)-1]]; ok {
				return v
			}
		}
		return m
	})
}
