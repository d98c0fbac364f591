// Command etcd is a thin wrapper so hack/build-tools.sh can build the etcd server pinned in
// hack/versions.env with `go build` from the Go module proxy, without a release tarball.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
