// Package bus is the NATS side of a pyfleet node. It owns everything that
// touches a subject: the embedded nats-server (StartEmbedded), the client
// connection (Connect), the request/reply micro service that serves a
// call.Handler (Serve), lifecycle event publishing (EventPublisher) and the
// JetStream jobs of a pool (StartJobs, EnsureStreams).
//
// bus knows nothing of processes or Python: it turns NATS messages into
// call.Requests, hands them to a call.Handler (the pool, in a node) and turns
// results, chunks and *call.Errors back into messages with the headers of
// SPEC section 4. Subjects are built in subjects.go, headers and the error
// body are defined in reply.go; clients such as submit use the same names
// and ReplyError to read a reply.
//
// Goroutines: a Service runs one goroutine per accepted request and its Stop
// waits for them; Jobs runs one fetch loop, plus one goroutine and one lease
// heartbeat per job held, and its Stop waits for them. Everything else
// belongs to nats.go and nats-server.
package bus
