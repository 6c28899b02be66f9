// Command pyfleet-init is the init of a worker's PID namespace (package
// lifecycle/pidinit). When workers run in PID namespaces, poolnode starts
// it, from beside its own binary, for each worker it spawns, and for a
// worker forked from a --preload template the template's process that is
// PID 1 of the new namespace execs it in its adopt mode; it is not meant
// to be run by hand. Its first argument is pidinit.Arg, as when poolnode
// re-executes itself as the init, so both take the same command line.
package main
