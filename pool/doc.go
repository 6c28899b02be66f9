// Package pool owns a node's Python workers and the dispatch of calls to
// them. It spawns each worker through lifecycle, or with Config.Preload
// forks it from a template that imported the app once (preload.go), waits
// for its handshake line, dials its gRPC socket with the worker's secret,
// and keeps one Batches stream per worker on which many calls travel as
// frames, as many to a message as are ready together (proto/worker.proto).
// It restarts crashed workers with backoff, kills a worker whose sync call
// overran its deadline or that fails its health checks, recycles workers
// after MaxRequests calls, MaxAge or past MaxMemory, on Recycle and, one
// at a time, on Reload, pins sessions to workers, and bounds the number of
// waiting calls.
//
// pool knows nothing of NATS: it implements call.Handler, which bus
// serves, and call.Starter (StartCall, async.go), which starts a call on
// a free worker with no goroutine waiting for it.
package pool
