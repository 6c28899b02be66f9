package protocol

import (
	"encoding/json"
	"strconv"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/call"
)

// ServiceName is the micro service every node registers, so that
// `nats micro ls|info|stats pyfleet` lists the whole fleet.
const ServiceName = "pyfleet"

// Keys of the micro service's metadata.
const (
	MetaPool   = "pool"
	MetaNode   = "node"
	MetaPrefix = "prefix"
	// MetaContainment is the mode that keeps the node's workers' process
	// trees: cgroup, pidns or group. A node that cannot say leaves it out.
	MetaContainment = "containment"
)

// Keys of a function endpoint's metadata: the function's name, whether it
// is raw or streams, and the JSON Schema (compact JSON text) of the body it
// takes and of the value it returns, left out when the worker gave none
// (a raw function's bytes, a schema over MaxSchemaBytes).
const (
	MetaFunction     = "function"
	MetaRaw          = "raw"
	MetaStream       = "stream"
	MetaInputSchema  = "input_schema"
	MetaOutputSchema = "output_schema"
)

// MaxSchemaBytes bounds each schema a node publishes, so that `nats micro
// info` of a node with many functions still fits in a NATS message. The
// worker replaces a larger one with a note (python/pyfleet/typed.py).
const MaxSchemaBytes = 4096

// ErrorBody is the JSON body of an error reply, of a stored error result
// and, with the job beside it, of a dead letter:
// {"error":{"code":…,"type":"…","message":"…"}}.
type ErrorBody struct {
	Error ErrorDetail `json:"error"`
}

// ErrorDetail is the inner object of ErrorBody: a code and a type from call
// (call.Code*, call.Type*, or the type of the Python exception) and a
// message for humans.
type ErrorDetail struct {
	Code    int    `json:"code"`
	Type    string `json:"type"`
	Message string `json:"message"`
}

// DeadLetter is the body of a dead-lettered job: the error, as in any error
// reply, and the job, so that an operator can see what failed and submit it
// again.
type DeadLetter struct {
	Error ErrorDetail `json:"error"`
	Job   DeadJob     `json:"job"`
}

// DeadJob describes the job in a DeadLetter.
type DeadJob struct {
	ID      string `json:"id"`
	Subject string `json:"subject"`
	// Seq is the job's sequence in the jobs stream (what its submitter's
	// publish acknowledgement said); a job without a usable Nats-Msg-Id
	// is named by it.
	Seq        uint64 `json:"seq"`
	Deliveries uint64 `json:"deliveries"`
	// Payload is the job's body when it is JSON, else PayloadBytes holds
	// it (base64 in JSON).
	Payload      json.RawMessage `json:"payload,omitempty"`
	PayloadBytes []byte          `json:"payload_bytes,omitempty"`
	// PayloadTruncated says that the whole dead letter would have been too
	// large to publish: PayloadBytes holds only the first bytes of the
	// body (maybe none), and PayloadSize its size.
	PayloadTruncated bool `json:"payload_truncated,omitempty"`
	PayloadSize      int  `json:"payload_size,omitempty"`
}

// ReplyError returns the failure that a reply, a stored result or a dead
// letter with headers h and body carries, or nil for a success. The JSON
// body is preferred; the headers fill what it lacks, so that a reply from a
// NATS micro service that sets only the error headers is understood too.
func ReplyError(h nats.Header, body []byte) *call.Error {
	code := Header(h, HeaderErrorCode)
	if code == "" && Header(h, HeaderStatus) != StatusError {
		return nil
	}
	e := &call.Error{Worker: Header(h, HeaderWorker)}
	var b struct {
		Error *ErrorDetail `json:"error"`
	}
	if json.Unmarshal(body, &b) == nil && b.Error != nil {
		e.Code, e.Type, e.Message = b.Error.Code, b.Error.Type, b.Error.Message
	}
	if e.Code == 0 {
		e.Code, _ = strconv.Atoi(code)
	}
	if e.Code == 0 {
		e.Code = call.CodeFailed
	}
	if e.Message == "" {
		e.Message = Header(h, HeaderError)
	}
	if e.Type == "" {
		e.Type = call.TypeError
	}
	return e
}
