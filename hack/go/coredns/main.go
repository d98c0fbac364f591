// Command coredns is a slim CoreDNS, pinned in hack/versions.env, with only the plugins the
// test cluster's DNS uses, so hack/build-tools.sh builds it from the Go module proxy in a
// fraction of the time of the full binary (whose core/plugin package links every plugin).
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	// The plugins we use; each registers itself with Caddy in its init. bind is needed to
	// listen on one address (the bridge IP) instead of the wildcard.
	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func main() {
	// The same relative order as CoreDNS's generated core/dnsserver/zdirectives.go (from its
	// plugin.cfg): a plugin sees every request before the plugins after it.
	dnsserver.Directives = []string{
		"bind",
		"ready",
		"health",
		"errors",
		"log",
		"loadbalance",
		"cache",
		"kubernetes",
	}
	coremain.Run()
}
