package test

import (
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/protocol"
)

// Issue 9, "Bad input gets a clear 4xx and nothing else": what a NATS
// publisher may send to a real node, each case ending with the node still
// serving with all its workers (and no leaked process, by startNode).

// hostileRequest sends body with the header values (name, value, …) to fn
// on the default pool and returns the reply.
func hostileRequest(t *testing.T, nc *nats.Conn, fn, body string, hdr ...string) *nats.Msg {
	t.Helper()
	m := nats.NewMsg(protocol.Subjects{}.Request("default", fn))
	m.Data = []byte(body)
	for i := 0; i+1 < len(hdr); i += 2 {
		m.Header[hdr[i]] = []string{hdr[i+1]}
	}
	reply, err := nc.RequestMsg(m, 10*time.Second)
	if err != nil {
		t.Fatalf("%s %.40q: %v", fn, body, err)
	}
	return reply
}

// wantRefused checks that reply is an error with code and type whose
// message contains every one of naming, and returns the error.
func wantRefused(t *testing.T, reply *nats.Msg, code int, typ string, naming ...string) *call.Error {
	t.Helper()
	e := protocol.ReplyError(reply.Header, reply.Data)
	if e == nil || e.Code != code || e.Type != typ {
		t.Fatalf("reply %v %q, want %d %s", reply.Header, reply.Data, code, typ)
	}
	for _, s := range naming {
		if !strings.Contains(e.Message, s) {
			t.Errorf("message %q does not name %q", e.Message, s)
		}
	}
	return e
}

func TestHostileInputHeaders(t *testing.T) {
	n := startNode(t, nodeOptions{})
	nc := n.connect()

	// The reproduction: three requests with a request id that is
	// not UTF-8 once took a 2-worker node out of service.
	for range 3 {
		reply := hostileRequest(t, nc, "echo", `{"a":1}`, protocol.HeaderRequestID, "\xff\xfe")
		wantRefused(t, reply, call.CodeBadRequest, call.TypeBadRequest, protocol.HeaderRequestID, "not valid UTF-8")
		if v, ok := reply.Header[protocol.HeaderRequestID]; ok {
			t.Errorf("the 400 echoes the bad request id: %q", v)
		}
		if reply.Header.Get(protocol.HeaderWorker) != "" {
			t.Errorf("a worker saw the request: %v", reply.Header)
		}
	}
	out, errOut, code := runSubmit(t, n.url, "", "call", "echo", `{}`)
	if code != 0 || strings.TrimSpace(out) != `{}` {
		t.Fatalf("submit call echo after the bad ids: exit %d, %q %q", code, out, errOut)
	}

	for _, name := range []string{protocol.HeaderRequestID, protocol.HeaderSession, protocol.HeaderTimeout,
		protocol.HeaderHeartbeat, protocol.HeaderReplyTo, protocol.HeaderMsgID} {
		for why, v := range map[string]string{
			"not valid UTF-8":             "ok\xc3",
			"over the limit of 256 bytes": strings.Repeat("9", 257),
			"control character":           "1\x00\x1b",
		} {
			reply := hostileRequest(t, nc, "echo", `{}`, name, v, protocol.HeaderSession+"-Ok", "fine")
			wantRefused(t, reply, call.CodeBadRequest, call.TypeBadRequest, "header "+name, why)
			if _, ok := reply.Header[protocol.HeaderRequestID]; ok {
				t.Errorf("%s %s: the 400 carries a request id", name, why)
			}
		}
	}
	assertStillServing(t, n, nc, 2)
}

func TestHostileInputTimeout(t *testing.T) {
	n := startNode(t, nodeOptions{extra: []string{"--max-timeout", "10s", "--request-timeout", "2s"}})
	nc := n.connect()
	for _, v := range []string{"10001", "4294967297", strconv.FormatUint(1<<32+100, 10), "9223372036854775807", "99999999999999999999"} {
		reply := hostileRequest(t, nc, "echo", `{}`, protocol.HeaderTimeout, v)
		wantRefused(t, reply, call.CodeBadRequest, call.TypeBadRequest, protocol.HeaderTimeout, "limit of 10000", "--max-timeout")
	}
	// At the limit, the call runs (and a timeout of 2^32+100 ms would
	// once have reached the worker as 100 ms).
	reply := hostileRequest(t, nc, "sleep", `300`, protocol.HeaderTimeout, "10000")
	if e := protocol.ReplyError(reply.Header, reply.Data); e != nil {
		t.Fatalf("sleep 300 ms with a 10 s timeout: %v", e)
	}
	// Without the header, --request-timeout applies.
	start := time.Now()
	reply = hostileRequest(t, nc, "slow_async", `{"ms":8000}`)
	wantRefused(t, reply, call.CodeDeadline, call.TypeDeadline)
	if d := time.Since(start); d < 2*time.Second || d > 7*time.Second {
		t.Errorf("408 after %s, want the 2 s of --request-timeout", d)
	}
	assertStillServing(t, n, nc, 2)
}

func TestHostileInputJSON(t *testing.T) {
	n := startNode(t, nodeOptions{})
	nc := n.connect()
	for body, why := range map[string]string{
		strings.Repeat("[", 65) + strings.Repeat("]", 65):               "nested deeper than 64 levels",
		strings.Repeat(`{"a":`, 5000) + "1" + strings.Repeat("}", 5000): "nested deeper than 64 levels",
		`{"x":1e999999}`:                       "beyond the range of a 64-bit float",
		`[` + strings.Repeat("9", 309) + `.0]`: "beyond the range of a 64-bit float",
		strings.Repeat("1", 4301):              "over the limit of 4300",
		`"\ud800"`:                             "unpaired surrogate",
		"\"\xff\xfe\"":                         "not valid UTF-8",
	} {
		for _, fn := range []string{"echo", "sum", "count"} { // sync, async, generator
			reply := hostileRequest(t, nc, fn, body)
			e := wantRefused(t, reply, call.CodeBadRequest, call.TypeBadRequest, why)
			if e.Worker != "" || strings.Contains(e.Message, "Traceback") {
				t.Errorf("%s %.30q: answered by a worker: %+v", fn, body, e)
			}
		}
	}
	// At the edge of the rule, the worker takes it and gives it back.
	for body, want := range map[string]string{
		strings.Repeat("[", 64) + strings.Repeat("]", 64):     strings.Repeat("[", 64) + strings.Repeat("]", 64),
		strings.Repeat("1", 4300):                             strings.Repeat("1", 4300),
		`[1.7976931348623157e308, 1e-999999, "\ud83d\ude00"]`: `[1.7976931348623157e+308,0.0,"😀"]`,
	} {
		reply := hostileRequest(t, nc, "echo", body)
		if e := protocol.ReplyError(reply.Header, reply.Data); e != nil {
			t.Fatalf("echo %.30q: %v", body, e)
		}
		if string(reply.Data) != want {
			t.Errorf("echo %.30q answered %.60q", body, reply.Data)
		}
	}
	assertStillServing(t, n, nc, 2)
}

func TestHostileInputReplyTooLarge(t *testing.T) {
	n := startNode(t, nodeOptions{app: filepath.Join(repoRoot, "test", "apps", "oversize.py")})
	nc := n.connect()
	max := int(nc.MaxPayload())
	id := strings.Repeat("r", protocol.MaxHeaderValue)
	for _, tc := range []struct{ fn, what string }{
		{"big", "a result"},
		{"big_error", "an error message"},
		// A body that fits alone, but not with the reply's headers.
		{"echo", "a reply with its headers"},
	} {
		body := `{"bytes":` + strconv.Itoa(max+1) + `}`
		if tc.fn == "echo" {
			body = `"` + strings.Repeat("x", max-protocol.MaxHeaderValue-80) + `"`
		}
		reply := hostileRequest(t, nc, tc.fn, body, protocol.HeaderRequestID, id)
		wantRefused(t, reply, call.CodeTooLarge, call.TypeTooLarge, "over the limit of "+strconv.Itoa(max))
		if len(reply.Data) > 1024 || len(reply.Header.Get(protocol.HeaderError)) > 1024 {
			t.Errorf("%s: the 413 carries %d bytes of body", tc.what, len(reply.Data))
		}
		if got := reply.Header.Get(protocol.HeaderRequestID); got != id {
			t.Errorf("%s: the 413 has request id %q", tc.what, got)
		}
	}
	// A stream whose chunk is too large ends with a 413 after the chunks
	// that fit.
	inbox := nc.NewRespInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := nc.PublishRequest(protocol.Subjects{}.Request("default", "big_chunk"), inbox, []byte(`{"bytes":`+strconv.Itoa(max+1)+`}`)); err != nil {
		t.Fatal(err)
	}
	var kinds []string
	for {
		m, err := sub.NextMsg(10 * time.Second)
		if err != nil {
			t.Fatalf("stream after %v: %v", kinds, err)
		}
		kinds = append(kinds, m.Header.Get(protocol.HeaderStream))
		if m.Header.Get(protocol.HeaderStream) == protocol.StreamEnd {
			wantRefused(t, m, call.CodeTooLarge, call.TypeTooLarge)
			break
		}
	}
	if strings.Join(kinds, ",") != "chunk,end" {
		t.Errorf("stream messages %v, want a chunk and the end", kinds)
	}
	assertStillServing(t, n, nc, 2)
}
