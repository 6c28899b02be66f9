// Package bus is the NATS side of a pyfleet node. It owns everything that
// touches a subject: the embedded nats-server, the client connection, the
// request/reply micro service that serves a call.Handler, lifecycle event
// publishing and (in jobs.go) the JetStream job consumer.
//
// bus knows nothing of processes or Python: it turns NATS messages into
// call.Requests, hands them to a call.Handler (pool.Pool in a node) and turns
// results, chunks and *call.Errors back into messages with the headers SPEC
// section 4 promises. Subjects, headers and the error body are the external
// contract; they are defined once, in subjects.go and reply.go.
//
// Goroutines: Service runs one goroutine per accepted request and Stop waits
// for them; Jobs runs one fetch loop plus one goroutine per running job and
// Jobs.Stop waits for them. Nothing else in the package starts goroutines that
// outlive a call, apart from those nats.go and nats-server own.
package bus
