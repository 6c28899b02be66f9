// Command pyfleet-init is the init of a worker's PID namespace (package
// lifecycle/pidinit). poolnode starts it, from beside its own binary, for
// every worker start when workers run in PID namespaces; it is not meant
// to be run by hand. Its first argument is pidinit.Arg, as when poolnode
// re-executes itself as the init, so both take the same command line.
package main

import (
	"fmt"
	"os"

	"github.com/pyfleet/pyfleet/lifecycle/pidinit"
)

func main() {
	if len(os.Args) < 2 || os.Args[1] != pidinit.Arg {
		fmt.Fprintln(os.Stderr, "pyfleet-init: the init of a pyfleet worker's PID namespace, started by poolnode; not meant to be run by hand")
		os.Exit(2)
	}
	os.Exit(pidinit.Main(os.Args[2:]))
}
