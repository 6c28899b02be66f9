// Package bus is the NATS side of a pyfleet node. It owns everything that
// touches a subject: the embedded nats-server (StartEmbedded), the client
// connection (Connect), the request/reply micro service that serves a
// call.Handler (Serve), lifecycle event publishing (EventPublisher) and the
// JetStream jobs of a pool (StartJobs, EnsureStreams, StreamConfigs).
//
// bus knows nothing of processes or Python: it turns NATS messages into
// call.Requests, hands them to a call.Handler (the pool, in a node) and turns
// results, chunks and *call.Errors back into messages. The names on the
// wire (subjects, headers, the error and dead-letter bodies, the service
// name) are package protocol's, which clients such as cmd/submit import
// too; docs/protocol.md is the contract. What bus adds is the node's side
// of it: what a request must be to be admitted (service.go, validate.go),
// how a reply is built (reply.go) and how a job is settled.
//
// Files: embedded.go starts the embedded server; conn.go connects;
// events.go publishes lifecycle events; service.go serves calls;
// validate.go holds the header rule and the JSON rule; reply.go builds
// reply headers and error bodies; streams.go describes and creates the
// JetStream streams; for jobs, jobs.go starts and stops them and their
// three consumers (one per priority), fetch.go pulls as many as there is
// capacity for, high priority first, delivery.go reads who a delivered job
// is and keeps its lease, settle.go runs it and acks, retries or buries
// it, collect.go gathers a streamed job's items, results.go looks up,
// stores and forwards results, dead.go writes dead letters, status.go
// keeps each job's status and takes cancels, and schedule.go turns
// message schedules on in an older jobs stream and names the jobs they
// fire.
//
// Goroutines: a Service runs one goroutine per request it hands to Call,
// and its Stop waits for them; a plain call started through call.Starter
// gets none, and is answered from the handler's goroutine. A call's
// heartbeats are a timer, whose last fire the call waits for before its
// answer goes. Jobs runs one fetch
// loop, plus one goroutine and one lease renewer per job held, and its
// Stop waits for them. Everything else belongs to nats.go and
// nats-server.
package bus
