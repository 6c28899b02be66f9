// Package call holds the few types that pass between the NATS side (bus) and
// the worker side (pool) of a node: a function's description (Function), a
// request, a streamed chunk, a result and an error with its HTTP-like
// code, and the codes and type names of the errors pyfleet itself answers
// with, which both sides and every client (through protocol) use; and the
// interfaces between them: Handler, which pool implements and bus serves,
// and Starter and Running, for a call started without a goroutine waiting
// for it. It exists so that neither side imports the other; it owns no
// goroutines and no state.
package call
