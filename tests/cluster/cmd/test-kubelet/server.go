package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"k8s.io/klog/v2"
)

// serveAPI: the part of the kubelet API `kubectl logs` needs (the apiserver proxies
// GET /containerLogs/NS/POD/CONTAINER to the node). HTTPS with a self-signed
// certificate (the apiserver is not given a kubelet CA, as in envtest), on the node's
// address on the pod network only. No authentication: only this machine reaches it.
func serveAPI(ctx context.Context, addr, stateDir string) error {
	cert, err := selfSigned()
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok") })
	mux.HandleFunc("GET /containerLogs/{ns}/{pod}/{container}", func(w http.ResponseWriter, r *http.Request) {
		containerLogs(w, r, stateDir)
	})
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: mux, TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	go func() {
		if err := srv.ServeTLS(ln, "", ""); err != nil && err != http.ErrServerClosed {
			klog.Errorf("kubelet API: %v", err)
		}
	}()
	return nil
}

func selfSigned() (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: "test-kubelet"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

// containerLogs serves a container's output file (tailLines, limitBytes, follow; a
// follow ends once the container has exited).
func containerLogs(w http.ResponseWriter, r *http.Request, stateDir string) {
	ns, pod, container := r.PathValue("ns"), r.PathValue("pod"), r.PathValue("container")
	dirs, _ := filepath.Glob(filepath.Join(stateDir, "pods", fmt.Sprintf("%s_%s_*", ns, pod)))
	var logs []string
	for _, d := range dirs {
		if p := filepath.Join(d, "logs", container+".log"); fileExists(p) {
			logs = append(logs, p)
		}
	}
	if len(logs) == 0 {
		http.Error(w, fmt.Sprintf("no logs of container %q in pod %s/%s on this node", container, ns, pod), http.StatusNotFound)
		return
	}
	sort.Slice(logs, func(i, j int) bool { return modTime(logs[i]).Before(modTime(logs[j])) })
	f, err := os.Open(logs[len(logs)-1]) // the newest pod of that name
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	defer f.Close()
	q := r.URL.Query()
	data, _ := io.ReadAll(f)
	if n, err := strconv.Atoi(q.Get("tailLines")); err == nil && n >= 0 {
		lines := bytes.SplitAfter(data, []byte("\n"))
		if len(lines) > 0 && len(lines[len(lines)-1]) == 0 {
			lines = lines[:len(lines)-1]
		}
		if len(lines) > n {
			lines = lines[len(lines)-n:]
		}
		data = bytes.Join(lines, nil)
	}
	if n, err := strconv.Atoi(q.Get("limitBytes")); err == nil && n >= 0 && len(data) > n {
		data = data[:n]
	}
	w.Header().Set("Content-Type", "text/plain")
	out := bufio.NewWriter(w)
	out.Write(data)
	out.Flush()
	if q.Get("follow") != "true" {
		return
	}
	flusher, _ := w.(http.Flusher)
	buf := make([]byte, 32*1024)
	exited := strings.TrimSuffix(logs[len(logs)-1], ".log") + ".exited"
	for {
		// Checked before the read: what the process wrote before it exited is sent.
		done := fileExists(exited)
		n, err := f.Read(buf)
		if n > 0 {
			w.Write(buf[:n])
			if flusher != nil {
				flusher.Flush()
			}
			continue
		}
		if err != nil && err != io.EOF || done {
			return // the container exited: the follow ends, as the kubelet's does
		}
		select {
		case <-r.Context().Done():
			return
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func fileExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && !st.IsDir()
}

func modTime(p string) time.Time {
	st, err := os.Stat(p)
	if err != nil {
		return time.Time{}
	}
	return st.ModTime()
}
