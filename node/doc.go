// Package node wires one poolnode: it validates the configuration, prepares
// the state dir and the private socket directory, joins NATS (or starts an
// embedded server), starts the pool of workers, serves it over NATS, and on
// shutdown drains, stops every worker and says so with lifecycle events. It
// is the glue between bus and pool, which know nothing of each other.
package node
