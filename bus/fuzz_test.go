package bus

import (
	"math"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"google.golang.org/protobuf/proto"

	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/proto/workerpb"
	"github.com/pyfleet/pyfleet/protocol"
)

// The fuzz targets of the request path. Their seeds (the f.Add calls and
// testdata/fuzz/<target>/) run in every `go test`; to search further:
//
//	go test -run XXX -fuzz FuzzAdmit -fuzztime 2m ./bus/
//
// A crasher it finds lands in testdata/fuzz/<target>/: commit it with the fix.

// hostileSeeds are the headers and bodies issue 9 names, and their kin.
var hostileSeeds = []struct {
	requestID, session, timeout, heartbeat, replyTo, msgID string
	body                                                   string
}{
	{"\xff\xfe", "", "", "", "", "", `{"a":1}`},
	{"", "\xff\xfe", "", "", "", "", `{"a":1}`},
	{"r-1", "s-1", "1500", "200", "app.results", "job-1", `{"a":1}`},
	{strings.Repeat("r", 256), strings.Repeat("s", 256), "3600000", "3600000", "", "", `[]`},
	{strings.Repeat("r", 257), "", "", "", "", "", `{}`},
	{"", "", "4294967297", "", "", "", `{}`},               // 2^32+1 ms: once ~1 ms on the wire
	{"", "", "4294967296000", "", "", "", `{}`},            // 2^32 s
	{"", "", "9223372036854775807", "", "", "", `{}`},      // max int64
	{"", "", "99999999999999999999999", "", "", "", `{}`},  // over int64
	{"", "", "3600001", "", "", "", `{}`},                  // just over 1 h
	{"", "", "-1", "-1", "", "", `{}`},                     //
	{"a\r\nInjected: yes", "", "", "", "", "", `{}`},       // header splitting
	{"\x00", "\t", "1\x00", "", "$JS.API.>", "\x7f", `{}`}, // control characters
	{"\u2028", "\u0085", "", "", "", "", `{}`},             // Unicode line separators
	{"", "", "", "", "", "", strings.Repeat("[", 65) + strings.Repeat("]", 65)},
	{"", "", "", "", "", "", strings.Repeat("[", 20000)},
	{"", "", "", "", "", "", `1e999999`},
	{"", "", "", "", "", "", `{"x":-1e400}`},
	{"", "", "", "", "", "", strings.Repeat("7", 4301)},
	{"", "", "", "", "", "", `"\ud800"`},
	{"", "", "", "", "", "", "\"\xff\xfe\""},
	{"", "", "", "", "", "", ``},
	{"", "", "", "", "", "", `NaN`},
}

// FuzzAdmit throws headers and a body at the node's admission (what handle
// refuses before any worker sees the call) and holds everything it admits
// to what a worker can take: the frame the pool builds from it (pool.execute)
// must marshal, a refusal must not echo a header that failed, and a JSON
// body must be one Python can decode and encode again.
func FuzzAdmit(f *testing.F) {
	for _, s := range hostileSeeds {
		f.Add(s.requestID, s.session, s.timeout, s.heartbeat, s.replyTo, s.msgID, false, []byte(s.body), false)
	}
	f.Add("\xff\xfe", "", "", "", "", "", true, []byte("\x00\xff raw"), true)
	limits := admitLimits{defaultTimeout: DefaultTimeout, maxTimeout: DefaultMaxTimeout, maxBytes: 1 << 20}
	f.Fuzz(func(t *testing.T, requestID, session, timeout, heartbeat, replyTo, msgID string, lower bool, body []byte, raw bool) {
		hdr := nats.Header{}
		for name, v := range map[string]string{
			protocol.HeaderRequestID: requestID, protocol.HeaderSession: session, protocol.HeaderTimeout: timeout,
			protocol.HeaderHeartbeat: heartbeat, protocol.HeaderReplyTo: replyTo, protocol.HeaderMsgID: msgID,
		} {
			if v == "" {
				continue
			}
			if lower {
				name = strings.ToLower(name)
			}
			hdr[name] = []string{v}
		}
		fn := &call.Function{Name: "echo", Raw: raw}
		a, err := admit(limits, hdr, "echo", fn, body)

		if a.requestID != "" && badHeaderValue(a.requestID) != "" {
			t.Fatalf("request id %q would be echoed (err %v)", a.requestID, err)
		}
		if err != nil {
			if err.Code != call.CodeBadRequest && err.Code != call.CodeTooLarge {
				t.Fatalf("refused with %d: %v", err.Code, err)
			}
			if a.req != nil {
				t.Fatalf("refused (%v) but a request was built", err)
			}
			if checkHeaders(hdr) != nil && a.requestID != "" {
				t.Fatalf("bad headers, but request id %q kept for the refusal", a.requestID)
			}
			return
		}
		for _, v := range []string{requestID, session, timeout, heartbeat, replyTo, msgID} {
			if why := badHeaderValue(v); why != "" {
				t.Fatalf("admitted a header value %q: %s", v, why)
			}
		}
		if a.timeout <= 0 || a.timeout > limits.maxTimeout {
			t.Fatalf("admitted a timeout of %s (max %s)", a.timeout, limits.maxTimeout)
		}
		if a.heartbeat != 0 && (a.heartbeat < minHeartbeat || a.heartbeat > time.Hour) {
			t.Fatalf("admitted a heartbeat of %s", a.heartbeat)
		}
		if !raw {
			if breach, ok := pythonCanTake(body); !ok || breach != "" {
				t.Fatalf("admitted %.60q: valid JSON %v, breach %q", body, ok, breach)
			}
		}

		// The frame pool.execute sends for this request.
		ms := a.timeout.Milliseconds()
		if ms > math.MaxUint32 {
			t.Fatalf("timeout of %d ms does not fit the frame's uint32 timeout_ms", ms)
		}
		frame := &workerpb.Call{Id: 1, Function: a.req.Function, Payload: a.req.Payload,
			RequestId: a.req.RequestID, Session: a.req.Session, TimeoutMs: uint32(max(ms, 1))}
		wire, merr := proto.Marshal(frame)
		if merr != nil {
			t.Fatalf("the worker's frame does not marshal: %v", merr)
		}
		var back workerpb.Call
		if err := proto.Unmarshal(wire, &back); err != nil || !proto.Equal(frame, &back) {
			t.Fatalf("the worker's frame does not survive the wire: %v", err)
		}
		if back.RequestId != requestID || back.Session != session {
			t.Fatalf("frame carries request id %q session %q, sent %q %q", back.RequestId, back.Session, requestID, session)
		}
	})
}

// FuzzCheckJSON holds checkJSON to json.Valid and to pythonCanTake, the same
// rule written on Go's own decoder: it admits exactly the JSON that
// follows the rule, and names what is wrong with the rest.
func FuzzCheckJSON(f *testing.F) {
	for _, s := range hostileSeeds {
		f.Add([]byte(s.body))
	}
	for body := range jsonRefused {
		if len(body) < 10_000 {
			f.Add([]byte(body))
		}
	}
	for _, body := range append(jsonAccepted, jsonMalformed...) {
		f.Add([]byte(body))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		err := checkJSON(body)
		breach, valid := pythonCanTake(body)
		switch {
		case err == nil && (!valid || breach != ""):
			t.Fatalf("admitted %.60q: valid JSON %v, breach %q", body, valid, breach)
		case err == nil:
			return
		case err.Code != call.CodeBadRequest || err.Type != call.TypeBadRequest:
			t.Fatalf("%.60q: refused with %d %s", body, err.Code, err.Type)
		case len(err.Message) > 200:
			t.Fatalf("%.60q: message of %d bytes", body, len(err.Message))
		case valid && breach == "":
			t.Fatalf("refused %.60q, which Python takes: %s", body, err.Message)
		case valid && !strings.HasPrefix(err.Message, "JSON not accepted: "):
			t.Fatalf("%.60q is JSON, but refused as %q (breach %q)", body, err.Message, breach)
		}
	})
}
