package bus

import (
	"encoding/json"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/pyfleet/pyfleet/call"
)

// Headers of the wire contract (SPEC section 4).
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
	// plain reply, as before.
	HeaderHeartbeat = "Pyfleet-Heartbeat"
	// HeaderReplyTo on a job names a subject that also gets the result.
	HeaderReplyTo = "Pyfleet-Reply-To"
	// HeaderMsgID is JetStream's dedup header; on a job it is the job id.
	HeaderMsgID = nats.MsgIdHdr

	// Reply headers.
	HeaderStatus = "Pyfleet-Status" // StatusOK or StatusError
	HeaderNode   = "Pyfleet-Node"
	HeaderWorker = "Pyfleet-Worker"
	HeaderStream = "Pyfleet-Stream" // StreamChunk or StreamEnd
	HeaderJobID  = "Pyfleet-Job-Id"
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
)

// Types of the errors bus itself answers with (the Python side names the
// others after the exception).
const (
	TypeBadRequest   = "BadRequest"
	TypeNotFound     = "NotFound"
	TypeDeadline     = "DeadlineExceeded"
	TypeTooLarge     = "TooLarge"
	TypeInternal     = "InternalError"
	TypeDraining     = "Draining"
	TypeInvalidJobID = "InvalidJobId"
)

// maxErrorHeader bounds the Nats-Service-Error value: a Python message can be
// a page long, and the full text is in the body anyway.
const maxErrorHeader = 1024

// ErrorBody is the JSON body of an error reply:
// {"error":{"code":…,"type":"…","message":"…"}}.
type ErrorBody struct {
	Error ErrorDetail `json:"error"`
}

// ErrorDetail is the inner object of ErrorBody.
type ErrorDetail struct {
	Code    int    `json:"code"`
	Type    string `json:"type"`
	Message string `json:"message"`
}

// ReplyError returns the error a reply carries, or nil when it reports
// success. It is for clients (submit, tests): a node always sets both the
// error headers and the body, but a reply from some other micro service may
// only have the headers.
func ReplyError(m *nats.Msg) *call.Error {
	code := header(m.Header, HeaderErrorCode)
	if code == "" && header(m.Header, HeaderStatus) != StatusError {
		return nil
	}
	e := &call.Error{Worker: header(m.Header, HeaderWorker), Message: header(m.Header, HeaderError)}
	e.Code, _ = strconv.Atoi(code)
	var body ErrorBody
	if json.Unmarshal(m.Data, &body) == nil && body.Error.Code != 0 {
		e.Code, e.Type, e.Message = body.Error.Code, body.Error.Type, body.Error.Message
	}
	if e.Code == 0 {
		e.Code = call.CodeFailed
	}
	return e
}

// header returns the first value of key, matching the name without regard to
// case when the exact spelling is absent: nats.Header is case-sensitive, and
// a user typing `nats req -H pyfleet-timeout:500` should not be ignored.
func header(h nats.Header, key string) string {
	if v := h.Get(key); v != "" {
		return v
	}
	for k, v := range h {
		if len(v) > 0 && strings.EqualFold(k, key) {
			return v[0]
		}
	}
	return ""
}

// headerValue makes s safe as a header value: a CR or LF would end the
// header block early and corrupt the message.
func headerValue(s string, limit int) string {
	s = strings.Map(func(r rune) rune {
		if r == '\r' || r == '\n' || r == 0 {
			return ' '
		}
		return r
	}, s)
	if limit > 0 && len(s) > limit {
		cut := limit
		for cut > 0 && !utf8.RuneStart(s[cut]) {
			cut--
		}
		s = s[:cut] + "…"
	}
	return s
}

// asCallError turns whatever a handler returned into the error a caller
// sees: a *call.Error passes through, anything else is a 500 InternalError,
// since its text was not written for callers but is still the best clue.
func asCallError(err error) *call.Error {
	if ce, ok := err.(*call.Error); ok && ce != nil {
		if ce.Code == 0 {
			c := *ce
			c.Code = call.CodeFailed
			return &c
		}
		return ce
	}
	return &call.Error{Code: call.CodeFailed, Type: TypeInternal, Message: err.Error()}
}

// replyHeader starts the headers every reply carries.
func replyHeader(status, node, worker, requestID string) nats.Header {
	h := nats.Header{HeaderStatus: {status}, HeaderNode: {node}}
	if worker != "" {
		h[HeaderWorker] = []string{headerValue(worker, 0)}
	}
	if requestID != "" {
		h[HeaderRequestID] = []string{headerValue(requestID, 0)}
	}
	return h
}

// errorMsg builds the headers and body of an error reply.
func errorMsg(e *call.Error, node, requestID string) (nats.Header, []byte) {
	h := replyHeader(StatusError, node, e.Worker, requestID)
	h[HeaderError] = []string{errorDescription(e)}
	h[HeaderErrorCode] = []string{strconv.Itoa(e.Code)}
	body, _ := json.Marshal(ErrorBody{Error: ErrorDetail{Code: e.Code, Type: e.Type, Message: e.Message}})
	return h, body
}

// errorDescription is the Nats-Service-Error value: the message, or the type
// when the message is empty, because micro refuses an empty description and
// clients print this header alone.
func errorDescription(e *call.Error) string {
	d := e.Message
	if d == "" {
		d = e.Type
	}
	if d == "" {
		d = "error " + strconv.Itoa(e.Code)
	}
	return headerValue(d, maxErrorHeader)
}
