package client

import (
	"errors"
	"fmt"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/protocol"
)

// Sentinels, one per code a caller may want to act on; compare with
// errors.Is(err, client.ErrNotFound). Every *Error with the code matches,
// whatever its type, except ErrWorkerLost, which matches only 500 WorkerLost
// (any other 500 is the function's own exception). They are the Go side of
// the Python client's classes of the same names.
var (
	ErrBadRequest       = errors.New("pyfleet: bad request")         // 400
	ErrNotFound         = errors.New("pyfleet: not found")           // 404
	ErrDeadlineExceeded = errors.New("pyfleet: deadline exceeded")   // 408
	ErrSessionLost      = errors.New("pyfleet: session lost")        // 410
	ErrPayloadTooLarge  = errors.New("pyfleet: payload too large")   // 413
	ErrCancelled        = errors.New("pyfleet: cancelled")           // 499: a cancelled job
	ErrWorkerLost       = errors.New("pyfleet: worker lost")         // 500 WorkerLost
	ErrUnavailable      = errors.New("pyfleet: service unavailable") // 503
)

// Types the client itself gives to failures it concludes without a node's
// answer (Error.Local). The node's own types are call.Type*.
const (
	// TypeNoResponders: NATS says nothing subscribes to the subject, so no
	// node of the pool runs (503).
	TypeNoResponders = "NoResponders"
	// TypeNodeLost: the call got no sign of life at all, not even the
	// first heartbeat, within the heartbeat loss time: the node it reached
	// died before reading it, or the server lost it (503).
	TypeNodeLost = "NodeLost"
	// TypeNoJetStream: the server has no JetStream, or not for this
	// account, so there are no jobs (503).
	TypeNoJetStream = "NoJetStream"
	// TypeNoStream: a stream jobs need does not exist: no node has
	// created it yet (503).
	TypeNoStream = "NoStream"
	// TypeSlowConsumer: more of a call's answer arrived than the client
	// holds unread for one call (64 MiB), so it abandoned the call (500).
	TypeSlowConsumer = "SlowConsumer"
)

// Error is every failure of a call or a job that pyfleet answered, or that
// the client concluded from the wire: a node's error reply, a stored error
// result, a dead letter, or, with Local set, NATS's "no responders", a node
// that fell silent holding the call, a deadline passed with no answer.
//
// Code is HTTP-like and Type names the error: one of call.Type*, one of the
// Type* above, or the class of the Python exception the function raised
// (docs/protocol.md, "Codes and types"). errors.Is matches an *Error with
// the sentinel of its code.
type Error struct {
	Code    int
	Type    string
	Message string
	// Node that answered, or that held the call when it fell silent.
	Node string
	// Worker that ran the call, when one did.
	Worker string
	// Local is true when no node said this: the client concluded it (no
	// responders, a node lost, no answer by the deadline, no stream).
	Local bool
	// err is what a Local failure came from (context.DeadlineExceeded,
	// nats.ErrNoResponders), for errors.Is.
	err error
}

// Error is "code type: message", the form `submit` prints.
func (e *Error) Error() string {
	return fmt.Sprintf("%d %s: %s", e.Code, e.Type, e.Message)
}

// Unwrap returns the NATS or context error a Local failure came from.
func (e *Error) Unwrap() error { return e.err }

// Is matches the sentinel of e's code (ErrWorkerLost: of its type).
func (e *Error) Is(target error) bool {
	switch target {
	case ErrBadRequest:
		return e.Code == call.CodeBadRequest
	case ErrNotFound:
		return e.Code == call.CodeNotFound
	case ErrDeadlineExceeded:
		return e.Code == call.CodeDeadline
	case ErrSessionLost:
		return e.Code == call.CodeSessionLost
	case ErrPayloadTooLarge:
		return e.Code == call.CodeTooLarge
	case ErrCancelled:
		return e.Code == call.CodeCancelled
	case ErrWorkerLost:
		return e.Code == call.CodeFailed && e.Type == call.TypeWorkerLost
	case ErrUnavailable:
		return e.Code == call.CodeUnavailable
	}
	return false
}

// replyError is the failure a reply, stored result or dead letter carries,
// or nil for a success (protocol.ReplyError, with the node).
func replyError(h nats.Header, body []byte) *Error {
	ce := protocol.ReplyError(h, body)
	if ce == nil {
		return nil
	}
	return &Error{Code: ce.Code, Type: ce.Type, Message: ce.Message, Worker: ce.Worker,
		Node: protocol.Header(h, protocol.HeaderNode)}
}

func localError(code int, typ string, cause error, format string, args ...any) *Error {
	return &Error{Code: code, Type: typ, Message: fmt.Sprintf(format, args...), Local: true, err: cause}
}
