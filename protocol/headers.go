package protocol

import (
	"strings"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
)

// Headers of the wire contract (docs/protocol.md, "Headers").
const (
	// Request headers.
	HeaderTimeout   = "Pyfleet-Timeout" // positive integer milliseconds
	HeaderSession   = "Pyfleet-Session"
	HeaderRequestID = "Pyfleet-Request-Id"
	// HeaderHeartbeat on a request asks the node to send a heartbeat
	// (HeaderStream StreamHeartbeat) to the reply subject at once and then
	// every that many milliseconds until the answer: a client that stops
	// hearing them knows the node holding its call died, without waiting
	// for its deadline. Plain requesters send no such header and get one
	// plain reply.
	HeaderHeartbeat = "Pyfleet-Heartbeat"
	// HeaderProgress on a request asks the node to send each ctx.progress
	// value of the call to the reply subject, as a message with
	// HeaderStream StreamProgress, before the answer. Any value but "" and
	// "0" asks; plain requesters send none and get one plain reply.
	HeaderProgress = "Pyfleet-Progress"
	// HeaderReplyTo on a job names a subject that also gets the result.
	HeaderReplyTo = "Pyfleet-Reply-To"
	// HeaderMsgID is JetStream's dedup header; on a job it is the job id.
	HeaderMsgID = nats.MsgIdHdr

	// Reply headers.
	HeaderStatus = "Pyfleet-Status" // StatusOK or StatusError
	HeaderNode   = "Pyfleet-Node"
	HeaderWorker = "Pyfleet-Worker"
	HeaderStream = "Pyfleet-Stream" // StreamChunk, StreamEnd, StreamHeartbeat or StreamProgress
	HeaderJobID  = "Pyfleet-Job-Id"
	// HeaderFunction on a stored result names the function of its job.
	// With Pyfleet-Job-Id it is how a later delivery of a job knows that a
	// stored result is its own before it acks the job without running it.
	HeaderFunction = "Pyfleet-Function"
	// HeaderError and HeaderErrorCode are micro's, so that every NATS
	// service client understands a pyfleet failure.
	HeaderError     = micro.ErrorHeader
	HeaderErrorCode = micro.ErrorCodeHeader
)

// Values of HeaderStatus and HeaderStream.
const (
	StatusOK        = "ok"
	StatusError     = "error"
	StreamChunk     = "chunk"
	StreamEnd       = "end"
	StreamHeartbeat = "heartbeat"
	StreamProgress  = "progress"
)

// MaxHeaderValue caps the value of every pyfleet request header (and of
// Nats-Msg-Id on a job) in bytes: enough for any id, session key or subject
// a client has reason to send, and small enough that a value copied into a
// reply, an event or a stored result never makes it too large to send. A
// value must also be UTF-8 without control characters.
const MaxHeaderValue = 256

// Header returns the first value of key, matching the name without regard
// to case when the exact spelling is absent: nats.Header is case-sensitive,
// a user typing `nats req -H pyfleet-timeout:500` should not be ignored,
// and a node written in another language may not canonicalise the way Go
// does.
func Header(h nats.Header, key string) string {
	if v := h[key]; len(v) > 0 && v[0] != "" {
		return v[0]
	}
	for k, v := range h {
		if len(v) > 0 && strings.EqualFold(k, key) {
			return v[0]
		}
	}
	return ""
}
