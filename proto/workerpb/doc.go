// Package workerpb is the generated Go code of proto/worker.proto, the wire
// between a poolnode and its Python workers (`make proto` regenerates it and
// python/pyfleet/_proto). It owns nothing else: what the messages mean is
// in the comments of proto/worker.proto.
package workerpb
