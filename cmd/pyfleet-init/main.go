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
