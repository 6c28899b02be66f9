// Command pyfleet-init is the init of a worker's PID namespace (package
// lifecycle/pidinit). poolnode starts it, from beside its own binary, for
// every worker start when workers run in PID namespaces; it is not meant
// to be run by hand. Its first argument is pidinit.Arg, as when poolnode
// re-executes itself as the init, so both take the same command line.
package main
