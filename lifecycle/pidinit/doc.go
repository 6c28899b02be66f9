// Package pidinit is the init of a worker's PID namespace: PID 1 of the
// namespace, the worker's parent, whose death makes the kernel kill every
// other process in the namespace. lifecycle's pidns.go starts it for a
// worker it spawns; for a worker forked from a --preload template, the
// template's process that is PID 1 of the new namespace execs it in its
// adopt mode (Adopt; lifecycle's preload.go, python/pyfleet/template.py).
//
// It is its own package, importing little beyond the standard library, so
// that bin/pyfleet-init (cmd/pyfleet-init) links nothing else: an init
// starts for every worker start, and a Go binary pays for every package
// it links at start-up. The node's binary re-executed with Arg is the
// fallback where pyfleet-init is not installed beside it.
package pidinit
