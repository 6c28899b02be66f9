package bus

import (
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/call"
)

// MaxHeaderValue caps the value of every pyfleet request header (and of
// Nats-Msg-Id on a job) in bytes: enough for any id, session key or subject
// a client has reason to send, and small enough that a value copied into a
// reply, an event or a stored result never makes it too large to send.
const MaxHeaderValue = 256

// checkedHeaders are the request headers whose values the node reads and
// passes on (to a worker's proto string fields, to replies, to JetStream).
var checkedHeaders = []string{
	HeaderRequestID, HeaderSession, HeaderTimeout, HeaderHeartbeat, HeaderReplyTo, HeaderMsgID,
}

// checkHeaders refuses a request whose pyfleet headers the node could not
// carry safely: a value that is not UTF-8 cannot go into a proto string
// (marshalling it would break the worker's whole stream, not only the call),
// a control character could split a header block, and a long value would be
// copied into every reply and stored result. Names match without regard to
// case, as header() reads them.
func checkHeaders(h nats.Header) *call.Error {
	for key, vals := range h {
		for _, name := range checkedHeaders {
			if !strings.EqualFold(key, name) {
				continue
			}
			for _, v := range vals {
				if why := badHeaderValue(v); why != "" {
					return call.Errorf(call.CodeBadRequest, TypeBadRequest, "header %s: %s", name, why)
				}
			}
		}
	}
	return nil
}

// badHeaderValue says what is wrong with v as a pyfleet header value, or "".
func badHeaderValue(v string) string {
	if len(v) > MaxHeaderValue {
		return "value of " + strconv.Itoa(len(v)) + " bytes is over the limit of " + strconv.Itoa(MaxHeaderValue) + " bytes"
	}
	if !utf8.ValidString(v) {
		return "value is not valid UTF-8"
	}
	for _, r := range v {
		if unicode.IsControl(r) {
			return "value contains a control character"
		}
	}
	return ""
}
