// etcd for the test control plane: the same entry point as etcd's own binary
// (go.etcd.io/etcd/v3's main.go), built from the server module.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
