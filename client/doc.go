// Package client is the Go client of pyfleet: it calls the functions of a
// pool, streams their items, keeps calls on one worker in a session,
// submits jobs (with a priority, delayed or recurring), waits for their
// results, reads their status and cancels them, lists the live nodes, their
// statuses and the pool's functions, asks a node to reload, recycle a
// worker or drain, and follows the nodes' lifecycle events, over NATS
// alone. It speaks the wire contract of docs/protocol.md through package
// protocol; cmd/submit is built on it.
//
//	c, err := client.Connect("nats://127.0.0.1:4222", client.Options{Pool: "default"})
//	...
//	defer c.Close()
//	var out map[string]int
//	err = c.Call(ctx, "echo", map[string]int{"hi": 1}, &out)
//	for item, err := range c.Stream(ctx, "count", map[string]int{"n": 3}) { ... }
//	job, err := c.Submit(ctx, "echo", map[string]int{"x": 1})
//	err = job.Result(ctx, &out)
//	job, err = c.Submit(ctx, "echo", 1, client.WithDelay(30*time.Second))
//	_, err = c.Schedule(ctx, "nightly", "0 3 * * *", "report", nil)
//	state, err := job.Status(ctx)
//	cancelled, err := job.Cancel(ctx)
//
// Delayed jobs (WithDelay, WithAt) and recurring ones (Schedule, Schedules,
// Unschedule) are JetStream message schedules that the NATS server (>=
// 2.12) keeps and fires, with or without a node running (client/schedule.go).
// WithPriority submits a job as high or low priority (priority.go). A job's
// status (Job.Info, Status, Progress) is read from the status bucket, and
// Job.Cancel marks it cancelled there and tells the node running it
// (status.go). NodeStatuses, and Nodes with WithDetail, ask the nodes for
// their status; Reload, Recycle and Drain are control requests to one node
// (nodestatus.go); Functions lists what the pool's nodes serve
// (functions.go).
//
// Every method takes a context.Context: its cancellation abandons the call,
// tells the node (which stops the function as at its deadline:
// docs/protocol.md, "Progress and cancel") and returns ctx.Err(); so does
// breaking out of a Stream loop. WithProgress gets the values a function
// passes to ctx.progress while it runs. Its deadline is the call's (sent to the node as
// Pyfleet-Timeout) unless WithTimeout gives another. Calls ask the node for
// heartbeats (Options.Heartbeat, one a second by default), so a call whose
// node dies fails within three intervals with ErrWorkerLost rather than
// at its deadline.
//
// Failures of calls and jobs are *Error, with the code, type and message of
// the node's answer and the node that sent it; errors.Is compares them with
// the sentinel of their code: ErrBadRequest (400), ErrNotFound (404),
// ErrDeadlineExceeded (408), ErrSessionLost (410), ErrPayloadTooLarge
// (413), ErrCancelled (499, a cancelled job), ErrWorkerLost (500
// WorkerLost) and ErrUnavailable (503). What the
// client concludes without a node's answer is an *Error too, with Local
// set: NATS's "no responders" and a call no node took are ErrUnavailable,
// a node that fell silent holding a call ErrWorkerLost, no answer by the
// deadline ErrDeadlineExceeded.
//
// Streams, job results and events are range-over-func sequences
// (iter.Seq2[T, error]): items come as the node sends them, an error ends
// the sequence, and breaking out of the loop abandons what is left.
//
// Ownership: a Client owns one subscription (the inbox through which every
// answer comes, made at the first call) and, from Connect, its connection;
// Close ends both. Stream, Job.Messages and Events own what they start
// (a subscription, JetStream ordered consumers and the goroutines reading
// them) for the duration of their loop, and stop and wait for all of it
// before the loop ends; Nodes with WithDetail starts one goroutine and
// waits for it before it returns. The package imports nats.go and pyfleet's protocol
// and call packages, never nats-server nor any package of the node.
package client
