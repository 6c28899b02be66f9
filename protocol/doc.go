// Package protocol is pyfleet's wire contract as Go names: the subjects
// under a prefix (the node status and control subjects among them), the
// header names and values, the error and dead-letter bodies, the micro
// service's name and metadata keys, the rule for subject tokens, and how
// a client reads a reply. It also names what jobs and rate limits keep in
// JetStream: the job priorities and the order nodes fetch them in, the
// job status bucket, its keys and values (JobStatus and the Job* states),
// the message schedules of delayed and recurring jobs (their headers,
// subjects and CronPattern), and the rate bucket and ParseRate.
// docs/protocol.md describes the same contract for clients in any
// language.
//
// Both sides use it: bus, ratelimit and node build and read what they
// send and take with these names; client builds its calls and jobs with
// them and reads replies (ReplyError), and cmd/submit and ui, which go
// through client, take names and checks from it. It imports nats.go for nats.Header, nats.go's
// micro for the names of its error headers, and call for the error codes
// and types (call.Code*, call.Type*), never nats-server, so a client that
// imports it stays small. It owns no goroutines and no state.
package protocol
