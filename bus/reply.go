package bus

import (
	"encoding/json"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/protocol"
)

// maxErrorHeader bounds the Nats-Service-Error value: a Python message can be
// a page long, and the full text is in the body anyway.
const maxErrorHeader = 1024

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
	return &call.Error{Code: call.CodeFailed, Type: call.TypeInternal, Message: err.Error()}
}

// replyHeader starts the headers every reply carries.
// Every value is a one-element slice of a single array, with room for
// the two more headers an error or a stream frame adds: two allocations a
// reply instead of six (BenchmarkReplyHeader). Each slice's capacity is 1,
// so an append to one value can never write over the next.
func replyHeader(status, node, worker, requestID string) nats.Header {
	var vals *[6]string = new([6]string)
	h := make(nats.Header, 6)
	set := func(i int, k, v string) {
		vals[i] = v
		h[k] = vals[i : i+1 : i+1]
	}
	set(0, protocol.HeaderStatus, status)
	set(1, protocol.HeaderNode, node)
	if worker != "" {
		set(2, protocol.HeaderWorker, headerValue(worker, 0))
	}
	if requestID != "" {
		set(3, protocol.HeaderRequestID, headerValue(requestID, 0))
	}
	return h
}

// errorMsg builds the headers and body of an error reply.
func errorMsg(e *call.Error, node, requestID string) (nats.Header, []byte) {
	h := replyHeader(protocol.StatusError, node, e.Worker, requestID)
	h[protocol.HeaderError] = []string{errorDescription(e)}
	h[protocol.HeaderErrorCode] = []string{strconv.Itoa(e.Code)}
	body, _ := json.Marshal(protocol.ErrorBody{Error: protocol.ErrorDetail{Code: e.Code, Type: e.Type, Message: e.Message}})
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
