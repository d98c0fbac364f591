// pause is the pod sandbox's init process for the kubetron test cluster (no registry here serves
// registry.k8s.io/pause): as PID 1 it holds the pod's namespaces, reaps orphaned children and
// exits 0 on SIGTERM or SIGINT. Built static by hack/build-images.sh into localhost/kubetron/pause.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGCHLD, syscall.SIGTERM, syscall.SIGINT)
	for sig := range sigs {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		// Reap every child that has exited; -1 = any child, WNOHANG = do not block.
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
