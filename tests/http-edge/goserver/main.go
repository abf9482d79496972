// The Go reference of the differential corpus: net/http's own HTTP/1.1 server (what
// Knative's queue-proxy speaks) with a handler that reads each body whole and records
// the request as one JSON line, like recording_app.py does behind the other servers.
//
//	go build -o goserver . && ./goserver RECORDS.jsonl 127.0.0.1:PORT
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"sync"
	"time"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: goserver RECORDS.jsonl ADDR")
		os.Exit(2)
	}
	log, err := os.OpenFile(os.Args[1], os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	var mu sync.Mutex
	write := func(v map[string]any) {
		line, _ := json.Marshal(v)
		mu.Lock()
		defer mu.Unlock()
		log.Write(append(line, '\n'))
	}
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			// Not a complete request: it does not count as reaching the backend.
			write(map[string]any{"incomplete": err.Error(), "target": r.RequestURI})
			http.Error(w, "bad body", http.StatusBadRequest)
			return
		}
		headers := [][]string{}
		for k, vs := range r.Header {
			for _, v := range vs {
				headers = append(headers, []string{k, v})
			}
		}
		write(map[string]any{
			"method":  r.Method,
			"target":  r.RequestURI,
			"body":    latin1(body),
			"headers": headers,
		})
		w.Header().Set("Content-Type", "text/plain")
		fmt.Fprintf(w, "ok %s\n", r.RequestURI)
	})
	srv := &http.Server{Addr: os.Args[2], Handler: handler, ReadHeaderTimeout: 30 * time.Second}
	fmt.Fprintln(os.Stderr, srv.ListenAndServe())
	os.Exit(1)
}

// latin1 maps each byte to one rune, as the Python side decodes bodies.
func latin1(b []byte) string {
	r := make([]rune, len(b))
	for i, c := range b {
		r[i] = rune(c)
	}
	return string(r)
}
