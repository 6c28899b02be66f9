// Command poolnode serves a Python app's functions over NATS from a pool of
// supervised worker processes. See README.md, "poolnode".
//
// It owns the command line and the process's own life, nothing of the
// pool: flags, PYFLEET_<FLAG> variables and the --config file (flags.go,
// each filling only what the one before left unset), the logger, the
// signals (the first SIGINT or SIGTERM drains, a second aborts the drain)
// and the exit status (0, 1 at run time, 2 for the configuration). The
// node itself is package node. The same binary is also the node's
// guardian and, where bin/pyfleet-init is missing, the init of a worker's
// PID namespace: main hands over to package lifecycle when its first
// argument says so.
package main
