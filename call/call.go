package call

import (
	"context"
	"encoding/json"
	"fmt"
	"time"
)

// Codes that a call can fail with; they travel in Nats-Service-Error-Code.
const (
	CodeBadRequest  = 400 // the payload or a header is malformed, or the function raised BadRequest
	CodeNotFound    = 404 // no such function
	CodeDeadline    = 408 // the caller's deadline passed
	CodeSessionLost = 410 // the session's worker is gone
	CodeTooLarge    = 413 // the payload is over the size limit
	CodeCancelled   = 499 // the job was cancelled (HTTP's "client closed request")
	CodeFailed      = 500 // the function raised, or its worker died under it
	CodeUnavailable = 503 // the node is overloaded or draining
)

// Types of the errors pyfleet itself answers with; a function that raised
// answers with the type of its Python exception instead. They travel in the
// "type" of the error body (docs/protocol.md, "Codes and types").
const (
	TypeBadRequest    = "BadRequest"       // 400
	TypeInvalidJobID  = "InvalidJobId"     // 400: a job id that cannot be a subject token
	TypeNotFound      = "NotFound"         // 404
	TypeDeadline      = "DeadlineExceeded" // 408
	TypeSessionLost   = "SessionLost"      // 410
	TypeTooLarge      = "TooLarge"         // 413
	TypeCancelled     = "Cancelled"        // 499: cancelled before it finished
	TypeInternal      = "InternalError"    // 500: the node failed, not the function
	TypeWorkerLost    = "WorkerLost"       // 500: the worker died or its channel broke under the call
	TypeDeliveryLimit = "DeliveryLimit"    // 500: no node finished a job in its deliveries
	TypeDraining      = "Draining"         // 503
	TypeOverloaded    = "Overloaded"       // 503: a queue or session limit
	TypeNoWorker      = "NoWorker"         // 503: no worker ready to take a new session
	TypeResultRefused = "ResultRefused"    // 503: the results stream would not store a job's result
	// TypeError is what a client reads for a failure whose reply names no
	// type (a micro service that sets only the error headers).
	TypeError = "Error"
)

// Function describes one function the app exports.
type Function struct {
	Name   string
	Raw    bool // bytes in and out, no JSON
	Stream bool // a generator: answers with chunks
	// InputSchema and OutputSchema are the JSON Schemas of the body the
	// function takes and the value it returns, as its worker reported them;
	// nil when it reported none.
	InputSchema, OutputSchema json.RawMessage
	// RateLimit is the function's limit on starts per pool, as the app
	// declared it ("100/s"; protocol.ParseRate), or "" for none.
	RateLimit string
}

// Request is one call of a function.
type Request struct {
	Function  string
	Payload   []byte
	Session   string // empty: any worker
	RequestID string
	// Deadline is when the caller stops waiting; the zero time means none.
	// The caller's ctx carries the same deadline.
	Deadline time.Time
	// JobID is the job's id when the call runs a job; Attempt is which
	// delivery of it this is (0 is taken as 1, a call's). The function's
	// pyfleet.Context reads both.
	JobID   string
	Attempt int
	// Progress, when set, gets each value (JSON) the function passes to
	// ctx.progress, in order and before Call returns; nil drops them. The
	// worker rate-limits them, but Progress must still be quick.
	Progress func(value []byte)
	// Admitted, when set, is called once the handler counts the call in
	// its capacity (pool.Pool.Idle), before it waits for a slot, and at
	// most once. The job fetcher counts a fetched job itself until then:
	// counting it from before Call would leave a moment in which neither
	// does, and one job too many would be fetched.
	Admitted func()
}

// Chunk is one item a streaming function yielded.
type Chunk struct {
	Worker string
	Data   []byte
}

// Result is the value a function returned.
type Result struct {
	Worker string
	Data   []byte
}

// Emit receives the chunks of a streaming call, in order, before Call returns.
// An error stops the call.
type Emit func(Chunk) error

// Handler runs calls; pool.Pool implements it and bus serves it.
type Handler interface {
	// Functions lists what the app exports; it does not change while a node runs.
	Functions() []Function
	// Call runs req and returns its result. Failures are *Error.
	Call(ctx context.Context, req *Request, emit Emit) (Result, error)
}

// Starter is a Handler that can also start a call with no goroutine of
// the caller's waiting for it: bus serves a call of a function that does
// not stream this way, and answers from the goroutine that hears the
// call's end (test/bench/notes.md, "A leaner node path"). Progress, if
// req asks for it, goes to req.Progress from a goroutine of the
// handler's.
type Starter interface {
	// StartCall starts req at once, if it can, and returns it running, and
	// true; done then gets, exactly once, what Call would have returned,
	// from a goroutine of the handler's that it must not hold up for long.
	// req's Deadline must be set. StartCall returns false, having called
	// nothing, when it cannot start req at once (no free worker, a
	// session's first call): the caller then uses Call.
	StartCall(req *Request, done func(Result, error)) (Running, bool)
}

// Running is a call StartCall started.
type Running interface {
	// Cancel ends the call as the end of Call's ctx would: done gets what
	// Call would then have returned, if it has not had the call's end
	// already. Safe to call more than once, and after the end.
	Cancel()
}

// Error is a failed call: a code from the list above, the exception's type
// (or one of the types above) and a message for humans.
type Error struct {
	Code    int
	Type    string
	Message string
	// Worker that ran the call, when one did.
	Worker string
}

func (e *Error) Error() string {
	return fmt.Sprintf("%d %s: %s", e.Code, e.Type, e.Message)
}

// Errorf builds an *Error.
func Errorf(code int, typ, format string, args ...any) *Error {
	return &Error{Code: code, Type: typ, Message: fmt.Sprintf(format, args...)}
}
