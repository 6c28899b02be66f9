package bus_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/pyfleet/pyfleet/bus"
	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/protocol"
)

func request(t *testing.T, nc *nats.Conn, subject, body string, hdr ...string) *nats.Msg {
	t.Helper()
	m := nats.NewMsg(subject)
	m.Data = []byte(body)
	for i := 0; i+1 < len(hdr); i += 2 {
		m.Header.Set(hdr[i], hdr[i+1])
	}
	reply, err := nc.RequestMsg(m, 5*time.Second)
	if err != nil {
		t.Fatalf("request %s: %v", subject, err)
	}
	return reply
}

// wantError checks that reply is an error with code and type, in the headers
// and the body alike, and returns its message.
func wantError(t *testing.T, reply *nats.Msg, code int, typ string) string {
	t.Helper()
	if got := reply.Header.Get(protocol.HeaderStatus); got != protocol.StatusError {
		t.Errorf("%s = %q, want %q", protocol.HeaderStatus, got, protocol.StatusError)
	}
	if got := reply.Header.Get(protocol.HeaderErrorCode); got != strconv.Itoa(code) {
		t.Errorf("%s = %q, want %d", protocol.HeaderErrorCode, got, code)
	}
	var body protocol.ErrorBody
	if err := json.Unmarshal(reply.Data, &body); err != nil {
		t.Fatalf("error body %q: %v", reply.Data, err)
	}
	if body.Error.Code != code || body.Error.Type != typ {
		t.Errorf("error body = %+v, want code %d type %s", body.Error, code, typ)
	}
	if reply.Header.Get(protocol.HeaderError) == "" {
		t.Errorf("no %s header", protocol.HeaderError)
	}
	if e := protocol.ReplyError(reply.Header, reply.Data); e == nil || e.Code != code || e.Type != typ || e.Message != body.Error.Message {
		t.Errorf("ReplyError = %+v, want the body's error", e)
	}
	return body.Error.Message
}

func setup(t *testing.T, mod ...func(*bus.ServiceConfig)) (*nats.Conn, *fakeHandler, *bus.Service) {
	srv := MustServer(t)
	nc := MustConn(t, srv)
	h := &fakeHandler{worker: "w1"}
	s := MustServe(t, nc, "n1", h, mod...)
	return nc, h, s
}

func TestReplyOK(t *testing.T) {
	nc, h, _ := setup(t)
	reply := request(t, nc, "pyfleet.req.p.echo", `{"a":1}`,
		protocol.HeaderRequestID, "r-1", protocol.HeaderSession, "s-1", protocol.HeaderTimeout, "1500")
	if string(reply.Data) != `{"a":1}` {
		t.Errorf("body = %q", reply.Data)
	}
	for k, want := range map[string]string{
		protocol.HeaderStatus: protocol.StatusOK, protocol.HeaderNode: "n1", protocol.HeaderWorker: "w1",
		protocol.HeaderRequestID: "r-1", protocol.HeaderErrorCode: "",
	} {
		if got := reply.Header.Get(k); got != want {
			t.Errorf("%s = %q, want %q", k, got, want)
		}
	}
	if e := protocol.ReplyError(reply.Header, reply.Data); e != nil {
		t.Errorf("ReplyError = %v", e)
	}
	req := h.requests()[0]
	if req.Function != "echo" || req.Session != "s-1" || req.RequestID != "r-1" {
		t.Errorf("request = %+v", req)
	}
	if left := time.Until(req.Deadline); left <= 0 || left > 1500*time.Millisecond {
		t.Errorf("deadline in %s, want within 1.5 s", left)
	}
}

func TestDefaultTimeoutAndLowerCaseHeader(t *testing.T) {
	nc, h, _ := setup(t, func(c *bus.ServiceConfig) { c.DefaultTimeout = 3 * time.Second })
	request(t, nc, "pyfleet.req.p.echo", `1`)
	request(t, nc, "pyfleet.req.p.echo", `2`, "pyfleet-timeout", "200")
	reqs := h.requests()
	if left := time.Until(reqs[0].Deadline); left < 2*time.Second || left > 3*time.Second {
		t.Errorf("default deadline in %s, want about 3 s", left)
	}
	if left := time.Until(reqs[1].Deadline); left > 200*time.Millisecond {
		t.Errorf("lower-case header ignored: deadline in %s", left)
	}
}

func TestRawFunctionTakesAnyBytes(t *testing.T) {
	nc, _, _ := setup(t)
	reply := request(t, nc, "pyfleet.req.p.raw", "\x00\xffnot json")
	if string(reply.Data) != "\x00\xffnot json" || reply.Header.Get(protocol.HeaderStatus) != protocol.StatusOK {
		t.Errorf("reply = %q %v", reply.Data, reply.Header)
	}
}

func TestMalformedJSON(t *testing.T) {
	nc, h, _ := setup(t)
	for _, body := range []string{`{"a":`, `nope`, ``} {
		msg := wantError(t, request(t, nc, "pyfleet.req.p.echo", body), call.CodeBadRequest, call.TypeBadRequest)
		if !strings.HasPrefix(msg, "malformed JSON: ") {
			t.Errorf("body %q: message %q", body, msg)
		}
	}
	if n := h.count(); n != 0 {
		t.Errorf("handler ran %d times on malformed JSON", n)
	}
}

func TestUnknownFunction(t *testing.T) {
	nc, _, _ := setup(t)
	msg := wantError(t, request(t, nc, "pyfleet.req.p.nosuch", `{}`), call.CodeNotFound, call.TypeNotFound)
	if !strings.Contains(msg, `"nosuch"`) {
		t.Errorf("message %q does not name the function", msg)
	}
}

func TestFunctionError(t *testing.T) {
	nc, _, _ := setup(t)
	reply := request(t, nc, "pyfleet.req.p.fail", `{}`)
	if msg := wantError(t, reply, call.CodeFailed, "ValueError"); msg != "boom\nsecond line" {
		t.Errorf("message = %q", msg)
	}
	if got := reply.Header.Get(protocol.HeaderError); got != "boom second line" {
		t.Errorf("%s = %q, want the message on one line", protocol.HeaderError, got)
	}
	if got := reply.Header.Get(protocol.HeaderWorker); got != "w1" {
		t.Errorf("%s = %q", protocol.HeaderWorker, got)
	}
	if got := reply.Header.Get(protocol.HeaderNode); got != "n1" {
		t.Errorf("%s = %q", protocol.HeaderNode, got)
	}

	msg := wantError(t, request(t, nc, "pyfleet.req.p.oops", `{}`), call.CodeFailed, call.TypeInternal)
	if msg != "pipe broke" {
		t.Errorf("message = %q", msg)
	}
}

func TestDeadline(t *testing.T) {
	nc, _, _ := setup(t)
	start := time.Now()
	reply := request(t, nc, "pyfleet.req.p.sleep", `5000`, protocol.HeaderTimeout, "100")
	wantError(t, reply, call.CodeDeadline, call.TypeDeadline)
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("408 after %s", d)
	}
}

func TestBadTimeoutHeader(t *testing.T) {
	nc, h, _ := setup(t)
	for _, v := range []string{"abc", "0", "-5", "1.5", "10s", "99999999999999999999"} {
		msg := wantError(t, request(t, nc, "pyfleet.req.p.echo", `{}`, protocol.HeaderTimeout, v), call.CodeBadRequest, call.TypeBadRequest)
		if !strings.Contains(msg, protocol.HeaderTimeout) || !strings.Contains(msg, strconv.Quote(v)) {
			t.Errorf("%q: message %q does not name the header and value", v, msg)
		}
	}
	if n := h.count(); n != 0 {
		t.Errorf("handler ran %d times", n)
	}
}

func TestTooLarge(t *testing.T) {
	nc, h, _ := setup(t, func(c *bus.ServiceConfig) { c.MaxPayload = 16 })
	wantError(t, request(t, nc, "pyfleet.req.p.echo", `"0123456789abcdef"`), call.CodeTooLarge, call.TypeTooLarge)
	request(t, nc, "pyfleet.req.p.echo", `"short"`)
	if n := h.count(); n != 1 {
		t.Errorf("handler ran %d times, want 1", n)
	}
}

// stream sends one request to a streaming function and collects every
// message up to and including the end.
func stream(t *testing.T, nc *nats.Conn, subject, body string) []*nats.Msg {
	t.Helper()
	inbox := nc.NewRespInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := nc.PublishRequest(subject, inbox, []byte(body)); err != nil {
		t.Fatal(err)
	}
	var msgs []*nats.Msg
	for {
		m, err := sub.NextMsg(5 * time.Second)
		if err != nil {
			t.Fatalf("after %d messages: %v", len(msgs), err)
		}
		msgs = append(msgs, m)
		if m.Header.Get(protocol.HeaderStream) == protocol.StreamEnd {
			return msgs
		}
	}
}

func TestStream(t *testing.T) {
	nc, _, _ := setup(t)
	msgs := stream(t, nc, "pyfleet.req.p.count", `3`)
	if len(msgs) != 4 {
		t.Fatalf("%d messages, want 3 chunks and an end", len(msgs))
	}
	for i, m := range msgs[:3] {
		if m.Header.Get(protocol.HeaderStream) != protocol.StreamChunk || string(m.Data) != strconv.Itoa(i) ||
			m.Header.Get(protocol.HeaderWorker) != "w1" || m.Header.Get(protocol.HeaderNode) != "n1" {
			t.Errorf("chunk %d = %q %v", i, m.Data, m.Header)
		}
	}
	end := msgs[3]
	if end.Header.Get(protocol.HeaderStatus) != protocol.StatusOK || len(end.Data) != 0 || protocol.ReplyError(end.Header, end.Data) != nil {
		t.Errorf("end = %q %v", end.Data, end.Header)
	}

	msgs = stream(t, nc, "pyfleet.req.p.countfail", `2`)
	if len(msgs) != 3 {
		t.Fatalf("%d messages, want 2 chunks and an end", len(msgs))
	}
	if msg := wantError(t, msgs[2], call.CodeFailed, "RuntimeError"); msg != "generator raised" {
		t.Errorf("message = %q", msg)
	}
}

func TestNoReplySubjectRunsNothing(t *testing.T) {
	nc, h, _ := setup(t)
	if err := nc.Publish("pyfleet.req.p.echo", []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	// A request after it on the same connection is handled after it.
	request(t, nc, "pyfleet.req.p.echo", `{}`)
	time.Sleep(50 * time.Millisecond)
	if n := h.count(); n != 1 {
		t.Errorf("handler ran %d times, want 1", n)
	}
}

func TestDrain(t *testing.T) {
	nc, _, s := setup(t)
	slow := make(chan *nats.Msg, 1)
	go func() {
		m, err := nc.Request("pyfleet.req.p.sleep", []byte(`300`), 5*time.Second)
		if err != nil {
			t.Errorf("in-flight request: %v", err)
		}
		slow <- m
	}()
	time.Sleep(100 * time.Millisecond) // let it be accepted
	s.Drain()
	wantError(t, request(t, nc, "pyfleet.req.p.echo", `{}`), call.CodeUnavailable, call.TypeDraining)
	wantError(t, request(t, nc, "pyfleet.req.p.nosuch", `{}`), call.CodeUnavailable, call.TypeDraining)
	if m := <-slow; m == nil || m.Header.Get(protocol.HeaderStatus) != protocol.StatusOK {
		t.Errorf("in-flight request after drain: %v", m)
	}
}

func TestStopWaitsForInFlight(t *testing.T) {
	srv := MustServer(t)
	nc := MustConn(t, srv)
	h := &fakeHandler{worker: "w1"}
	s, err := bus.Serve(nc, bus.ServiceConfig{Pool: "p", Node: "n1"}, h, nil)
	if err != nil {
		t.Fatal(err)
	}
	replies := make(chan *nats.Msg, 2)
	for _, ms := range []string{"200", "10000"} {
		go func() {
			m, err := nc.Request("pyfleet.req.p.sleep", []byte(ms), 5*time.Second)
			if err != nil {
				t.Errorf("request: %v", err)
			}
			replies <- m
		}()
	}
	for h.count() < 2 {
		time.Sleep(5 * time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	start := time.Now()
	err = s.Stop(ctx)
	if err == nil || !strings.Contains(err.Error(), "1 calls still running") {
		t.Errorf("Stop = %v, want 1 call cut short", err)
	}
	if d := time.Since(start); d < 900*time.Millisecond {
		t.Errorf("Stop returned after %s, before its ctx ended", d)
	}
	var codes []string
	for range 2 {
		m := <-replies
		codes = append(codes, m.Header.Get(protocol.HeaderStatus)+m.Header.Get(protocol.HeaderErrorCode))
	}
	if strings.Join(codes, ",") != "ok,error503" {
		t.Errorf("replies = %v, want the short call ok and the long one 503", codes)
	}
	if err := s.Stop(context.Background()); err != nil {
		t.Errorf("second Stop = %v", err)
	}
	if _, err := nc.Request("pyfleet.req.p.echo", []byte(`{}`), 200*time.Millisecond); err != nats.ErrNoResponders {
		t.Errorf("request after Stop: %v, want no responders", err)
	}
}

func TestConcurrentRequestsAreNotSerialised(t *testing.T) {
	nc, _, _ := setup(t)
	const n, each = 20, 100 * time.Millisecond
	start := time.Now()
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			m, err := nc.Request("pyfleet.req.p.sleep", []byte(strconv.Itoa(int(each/time.Millisecond))), 5*time.Second)
			if err != nil || m.Header.Get(protocol.HeaderStatus) != protocol.StatusOK {
				t.Errorf("request: %v %v", err, m)
			}
		})
	}
	wg.Wait()
	if d, serial := time.Since(start), n*each; d > serial/4 {
		t.Errorf("%d calls of %s took %s; serialised they take %s", n, each, d, serial)
	}
}

// TestQueueGroupMerging checks the behaviour the wildcard endpoint relies on:
// a request to a known function matches both its own endpoint and the
// wildcard one, in the same queue group, and nats-server delivers it to
// exactly one of them, on one node.
func TestQueueGroupMerging(t *testing.T) {
	srv := MustServer(t)
	nc := MustConn(t, srv)
	h1, h2 := &fakeHandler{worker: "a"}, &fakeHandler{worker: "b"}
	MustServe(t, MustConn(t, srv), "n1", h1)
	MustServe(t, MustConn(t, srv), "n2", h2)

	const n = 200
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			m := request(t, nc, "pyfleet.req.p.echo", strconv.Itoa(i), protocol.HeaderRequestID, strconv.Itoa(i))
			if string(m.Data) != strconv.Itoa(i) {
				t.Errorf("request %d answered %q", i, m.Data)
			}
		})
	}
	wg.Wait()
	// Let any duplicate delivery show up before counting.
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	seen := map[string]int{}
	for _, r := range append(h1.requests(), h2.requests()...) {
		seen[r.RequestID]++
	}
	for i := range n {
		if c := seen[strconv.Itoa(i)]; c != 1 {
			t.Errorf("request %d ran %d times", i, c)
		}
	}
	if len(seen) != n {
		t.Errorf("%d distinct requests ran, want %d", len(seen), n)
	}
	// Both nodes take part: the chance that 200 random picks all land on
	// one of two nodes is 2^-199.
	if h1.count() == 0 || h2.count() == 0 {
		t.Errorf("work not shared: n1 ran %d, n2 ran %d", h1.count(), h2.count())
	}
}

func TestNodeSubject(t *testing.T) {
	srv := MustServer(t)
	nc := MustConn(t, srv)
	MustServe(t, MustConn(t, srv), "n1", &fakeHandler{worker: "a"})
	MustServe(t, MustConn(t, srv), "n2", &fakeHandler{worker: "b"})
	for range 20 {
		m := request(t, nc, "pyfleet.node.n2.p.echo", `{}`)
		if got := m.Header.Get(protocol.HeaderNode); got != "n2" {
			t.Fatalf("node subject of n2 answered by %q", got)
		}
	}
	wantError(t, request(t, nc, "pyfleet.node.n2.p.nosuch", `{}`), call.CodeNotFound, call.TypeNotFound)
	if _, err := nc.Request("pyfleet.node.n3.p.echo", []byte(`{}`), time.Second); err != nats.ErrNoResponders {
		t.Errorf("node n3: %v, want no responders", err)
	}
}

func TestPrefix(t *testing.T) {
	nc, _, _ := setup(t, func(c *bus.ServiceConfig) { c.Prefix = "acme.pf" })
	request(t, nc, "acme.pf.req.p.echo", `{}`)
	request(t, nc, "acme.pf.node.n1.p.echo", `{}`)
}

func TestServeRejectsBadNames(t *testing.T) {
	srv := MustServer(t)
	nc := MustConn(t, srv)
	for _, cfg := range []bus.ServiceConfig{
		{Pool: "a.b", Node: "n"},
		{Pool: "p", Node: "my node"},
		{Pool: "p", Node: "n", Prefix: "x..y"},
		{Pool: "", Node: "n"},
	} {
		if _, err := bus.Serve(nc, cfg, &fakeHandler{}, nil); err == nil {
			t.Errorf("Serve(%+v) accepted", cfg)
		}
	}
	_, err := bus.Serve(nc, bus.ServiceConfig{Pool: "p", Node: "n"}, &badNames{}, nil)
	if err == nil || !strings.Contains(err.Error(), `"a.b"`) {
		t.Errorf("Serve with a function named a.b: %v", err)
	}
}

type badNames struct{ fakeHandler }

func (*badNames) Functions() []call.Function { return []call.Function{{Name: "a.b"}} }

func TestMicroInfoAndStats(t *testing.T) {
	nc, _, _ := setup(t, func(c *bus.ServiceConfig) {
		c.Stats = func() any { return map[string]int{"workers": 4} }
		c.Containment = "group"
	})
	request(t, nc, "pyfleet.req.p.echo", `{}`)
	request(t, nc, "pyfleet.req.p.fail", `{}`)
	request(t, nc, "pyfleet.req.p.echo", `bad`)

	subj, err := micro.ControlSubject(micro.InfoVerb, protocol.ServiceName, "")
	if err != nil {
		t.Fatal(err)
	}
	var info micro.Info
	if err := json.Unmarshal(request(t, nc, subj, "").Data, &info); err != nil {
		t.Fatal(err)
	}
	if info.Name != "pyfleet" || info.Version != "1.2.3" || info.Metadata["pool"] != "p" || info.Metadata["node"] != "n1" ||
		info.Metadata["containment"] != "group" {
		t.Errorf("info = %+v", info.ServiceIdentity)
	}
	subjects := map[string]string{}
	for _, ep := range info.Endpoints {
		subjects[ep.Subject] = ep.QueueGroup
	}
	for _, want := range []string{"pyfleet.req.p.echo", "pyfleet.req.p.count", "pyfleet.req.p.*"} {
		if qg, ok := subjects[want]; !ok || qg != "pyfleet.p" {
			t.Errorf("endpoint %s: present %v, queue group %q", want, ok, qg)
		}
	}
	if _, ok := subjects["pyfleet.node.n1.p.*"]; !ok {
		t.Errorf("no node endpoint in %v", subjects)
	}

	subj, _ = micro.ControlSubject(micro.StatsVerb, protocol.ServiceName, info.ID)
	var stats micro.Stats
	if err := json.Unmarshal(request(t, nc, subj, "").Data, &stats); err != nil {
		t.Fatal(err)
	}
	if stats.Metadata["containment"] != "group" {
		t.Errorf("stats metadata %v: no containment=group for submit nodes", stats.Metadata)
	}
	var requests, errs int64
	var nodeSeen bool
	for _, ep := range stats.Endpoints {
		var d bus.EndpointData
		if err := json.Unmarshal(ep.Data, &d); err != nil {
			t.Fatalf("endpoint %s data %s: %v", ep.Subject, ep.Data, err)
		}
		requests += int64(ep.NumRequests)
		errs += d.Errors
		nodeSeen = nodeSeen || fmt.Sprint(d.Node) == "map[workers:4]"
	}
	if requests != 3 || errs != 2 {
		t.Errorf("stats: %d requests, %d errors; want 3 and 2", requests, errs)
	}
	if !nodeSeen {
		t.Errorf("node stats missing")
	}
}

func TestInProcessConnection(t *testing.T) {
	srv := MustServer(t)
	nc, err := bus.Connect(bus.ConnConfig{InProcess: srv, Name: "inproc"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	MustServe(t, nc, "n1", &fakeHandler{})
	var ok atomic.Int32
	for range 10 {
		if m := request(t, MustConn(t, srv), "pyfleet.req.p.echo", `{}`); m.Header.Get(protocol.HeaderStatus) == protocol.StatusOK {
			ok.Add(1)
		}
	}
	if ok.Load() != 10 {
		t.Errorf("%d of 10 ok", ok.Load())
	}
}

// A request that asks for heartbeats gets one at once, then one per
// interval while its call runs, and the answer is the last message: on a
// goroutine of the service's, and started through call.Starter, which
// the heartbeats do not keep a call from.
func TestHeartbeats(t *testing.T) {
	t.Run("goroutine", func(t *testing.T) {
		nc, _, _ := setup(t)
		testHeartbeats(t, nc)
	})
	t.Run("started", func(t *testing.T) {
		srv := MustServer(t)
		nc := MustConn(t, srv)
		h := &starterHandler{fakeHandler: &fakeHandler{worker: "w1"}}
		t.Cleanup(h.running.Wait)
		MustServe(t, nc, "n1", h)
		testHeartbeats(t, nc)
		if h.started.Load() == 0 {
			t.Error("no call was started through call.Starter")
		}
	})
}

func testHeartbeats(t *testing.T, nc *nats.Conn) {
	inbox := nc.NewRespInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	m := nats.NewMsg("pyfleet.req.p.sleep")
	m.Reply, m.Data = inbox, []byte(`450`)
	m.Header.Set(protocol.HeaderHeartbeat, "100")
	if err := nc.PublishMsg(m); err != nil {
		t.Fatal(err)
	}
	beats := 0
	for {
		msg, err := sub.NextMsg(5 * time.Second)
		if err != nil {
			t.Fatalf("after %d heartbeats: %v", beats, err)
		}
		if msg.Header.Get(protocol.HeaderStream) == protocol.StreamHeartbeat {
			if msg.Header.Get(protocol.HeaderNode) != "n1" {
				t.Errorf("heartbeat without its node: %v", msg.Header)
			}
			beats++
			continue
		}
		if msg.Header.Get(protocol.HeaderStatus) != protocol.StatusOK || string(msg.Data) != "null" {
			t.Errorf("answer %q %v", msg.Data, msg.Header)
		}
		break
	}
	// One at once and about four more in 450 ms; a loaded machine may
	// delay ticks, never add them.
	if beats < 2 || beats > 6 {
		t.Errorf("%d heartbeats for a 450 ms call at 100 ms", beats)
	}
	if extra, err := sub.NextMsg(300 * time.Millisecond); err == nil {
		t.Errorf("a message after the answer: %v", extra.Header)
	}
	for _, v := range []string{"abc", "10", "-1"} {
		r := request(t, nc, "pyfleet.req.p.echo", `{}`, protocol.HeaderHeartbeat, v)
		wantError(t, r, call.CodeBadRequest, call.TypeBadRequest)
	}
}

// requestMsg sends m and waits for the reply.
func requestMsg(t *testing.T, nc *nats.Conn, m *nats.Msg) *nats.Msg {
	t.Helper()
	reply, err := nc.RequestMsg(m, 5*time.Second)
	if err != nil {
		t.Fatalf("request %s: %v", m.Subject, err)
	}
	return reply
}

// Issue 9: a header value the node cannot carry (to a worker's proto
// string, to a reply) is a 400 that names the header and echoes none of it,
// and the next request is served as usual.
func TestHostileHeaders(t *testing.T) {
	nc, h, _ := setup(t)
	values := map[string]string{
		"not UTF-8":     "\xff\xfe",
		"too long":      strings.Repeat("x", protocol.MaxHeaderValue+1),
		"control chars": "a\x00b\x1b[31m",
	}
	for _, name := range []string{protocol.HeaderRequestID, protocol.HeaderSession, protocol.HeaderTimeout,
		protocol.HeaderHeartbeat, protocol.HeaderReplyTo, protocol.HeaderMsgID} {
		for what, v := range values {
			t.Run(name+"/"+what, func(t *testing.T) {
				m := nats.NewMsg("pyfleet.req.p.echo")
				m.Data = []byte(`{"a":1}`)
				m.Header[name] = []string{v}
				if name != protocol.HeaderRequestID {
					m.Header.Set(protocol.HeaderRequestID, "fine-id")
				}
				reply := requestMsg(t, nc, m)
				msg := wantError(t, reply, call.CodeBadRequest, call.TypeBadRequest)
				if !strings.HasPrefix(msg, "header "+name+": ") {
					t.Errorf("message %q does not name the header", msg)
				}
				if id, ok := reply.Header[protocol.HeaderRequestID]; ok {
					t.Errorf("the 400 carries %s %q", protocol.HeaderRequestID, id)
				}
				if strings.Contains(string(reply.Data), v) || strings.Contains(reply.Header.Get(protocol.HeaderError), v) {
					t.Errorf("the 400 echoes the bad value: %q", reply.Data)
				}
			})
		}
	}
	if n := h.count(); n != 0 {
		t.Errorf("handler ran %d times", n)
	}
	// The limit itself passes, and is echoed whole.
	id := strings.Repeat("é", protocol.MaxHeaderValue/2)
	reply := request(t, nc, "pyfleet.req.p.echo", `{"a":1}`, protocol.HeaderRequestID, id)
	if reply.Header.Get(protocol.HeaderStatus) != protocol.StatusOK || reply.Header.Get(protocol.HeaderRequestID) != id {
		t.Errorf("256-byte request id: %v", reply.Header)
	}
}

// Issue 9: Pyfleet-Timeout is held to --max-timeout, with no wrap on the
// way (2^32+1 ms was once about 1 ms on the wire to the worker).
func TestMaxTimeout(t *testing.T) {
	nc, h, _ := setup(t, func(c *bus.ServiceConfig) { c.MaxTimeout = 2 * time.Second })
	request(t, nc, "pyfleet.req.p.echo", `{}`, protocol.HeaderTimeout, "2000")
	for _, v := range []string{"2001", "4294967297", "9223372036854775"} {
		msg := wantError(t, request(t, nc, "pyfleet.req.p.echo", `{}`, protocol.HeaderTimeout, v), call.CodeBadRequest, call.TypeBadRequest)
		if !strings.Contains(msg, protocol.HeaderTimeout) || !strings.Contains(msg, "limit of 2000") || !strings.Contains(msg, "--max-timeout") {
			t.Errorf("%s: message %q does not name the header and the limit", v, msg)
		}
	}
	if n := h.count(); n != 1 {
		t.Errorf("handler ran %d times, want 1", n)
	}

	// The default limit is an hour.
	nc2, h2, _ := setup(t)
	request(t, nc2, "pyfleet.req.p.echo", `{}`, protocol.HeaderTimeout, "3600000")
	wantError(t, request(t, nc2, "pyfleet.req.p.echo", `{}`, protocol.HeaderTimeout, "3600001"), call.CodeBadRequest, call.TypeBadRequest)
	if left := time.Until(h2.requests()[0].Deadline); left < 59*time.Minute {
		t.Errorf("deadline of a 1 h timeout in %s", left)
	}
}

func TestDefaultTimeoutOverMaxIsRefused(t *testing.T) {
	srv := MustServer(t)
	nc := MustConn(t, srv)
	_, err := bus.Serve(nc, bus.ServiceConfig{Pool: "p", Node: "n1", DefaultTimeout: 2 * time.Hour}, &fakeHandler{}, nil)
	if err == nil || !strings.Contains(err.Error(), "max timeout") {
		t.Fatalf("Serve = %v, want an error about the max timeout", err)
	}
}

// Issue 9: JSON that Go accepts but Python cannot take is a 400 from the
// node, before any worker sees it; raw functions still take any bytes.
func TestJSONRule(t *testing.T) {
	nc, h, _ := setup(t)
	for body, why := range map[string]string{
		strings.Repeat("[", 65) + strings.Repeat("]", 65): "nested deeper than 64 levels",
		`{"x":1e999999}`:          "beyond the range of a 64-bit float",
		strings.Repeat("7", 4301): "over the limit of 4300",
		`"\ud800"`:                "unpaired surrogate",
		"\"\xff\xfe\"":            "not valid UTF-8",
	} {
		msg := wantError(t, request(t, nc, "pyfleet.req.p.echo", body), call.CodeBadRequest, call.TypeBadRequest)
		if !strings.Contains(msg, why) {
			t.Errorf("%.30q: message %q, want %q", body, msg, why)
		}
	}
	if n := h.count(); n != 0 {
		t.Errorf("handler ran %d times", n)
	}
	deep := strings.Repeat("[", 64) + strings.Repeat("]", 64)
	if reply := request(t, nc, "pyfleet.req.p.echo", deep); string(reply.Data) != deep {
		t.Errorf("64 levels: %q", reply.Data)
	}
	if reply := request(t, nc, "pyfleet.req.p.raw", `1e999999`); string(reply.Data) != `1e999999` {
		t.Errorf("raw: %q", reply.Data)
	}
}

// Issue 9: a result too big for the server's max_payload (body and headers
// together) is answered 413, with none of the result in it.
func TestReplyTooLarge(t *testing.T) {
	nc, _, _ := setup(t)
	max := int(nc.MaxPayload())
	body := `"` + strings.Repeat("x", max-64) + `"`
	reply := request(t, nc, "pyfleet.req.p.echo", body, protocol.HeaderRequestID, "big-1")
	msg := wantError(t, reply, call.CodeTooLarge, call.TypeTooLarge)
	if !strings.Contains(msg, "over the limit of "+strconv.Itoa(max)) {
		t.Errorf("message %q", msg)
	}
	if len(reply.Data) > 1024 {
		t.Errorf("the 413 is %d bytes", len(reply.Data))
	}
	if got := reply.Header.Get(protocol.HeaderRequestID); got != "big-1" {
		t.Errorf("%s = %q", protocol.HeaderRequestID, got)
	}
	if got := reply.Header.Get(protocol.HeaderWorker); got != "w1" {
		t.Errorf("%s = %q", protocol.HeaderWorker, got)
	}
}

// Issue 9: on a server whose max_payload barely holds a request, a reply
// whose headers alone are too big (a 256-byte request id and an error) is
// still answered: with a bare 413 if the full one does not fit either.
func TestReplyHeadersTooLarge(t *testing.T) {
	srv, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, MaxPayload: 400, NoLog: true, NoSigs: true})
	if err != nil {
		t.Fatal(err)
	}
	go srv.Start()
	t.Cleanup(func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	})
	if !srv.ReadyForConnections(10 * time.Second) {
		t.Fatal("server not ready")
	}
	nc := MustConn(t, srv)
	MustServe(t, nc, "n1", &fakeHandler{worker: "w1"})
	id := strings.Repeat("i", protocol.MaxHeaderValue)
	// An echo of {} fits with its id…
	if reply := request(t, nc, "pyfleet.req.p.echo", `{}`, protocol.HeaderRequestID, id); reply.Header.Get(protocol.HeaderRequestID) != id {
		t.Fatalf("echo: %v", reply.Header)
	}
	// …an error does not, nor does a 413 that names the id.
	reply := request(t, nc, "pyfleet.req.p.fail", `{}`, protocol.HeaderRequestID, id)
	wantError(t, reply, call.CodeTooLarge, call.TypeTooLarge)
	if _, ok := reply.Header[protocol.HeaderRequestID]; ok {
		t.Errorf("the bare 413 carries the request id")
	}
}

// A function that raises with a message of megabytes gets a 413, and the
// node's `nats micro stats` (which shows the last error) still fits in a
// message.
func TestHugeErrorMessage(t *testing.T) {
	nc, _, _ := setup(t)
	max := int(nc.MaxPayload())
	wantError(t, request(t, nc, "pyfleet.req.p.shout", strconv.Itoa(2*max)), call.CodeTooLarge, call.TypeTooLarge)
	wantError(t, request(t, nc, "pyfleet.req.p.shout", strconv.Itoa(max/2)), call.CodeFailed, "ValueError")
	subj, err := micro.ControlSubject(micro.StatsVerb, protocol.ServiceName, "")
	if err != nil {
		t.Fatal(err)
	}
	var stats micro.Stats
	if err := json.Unmarshal(request(t, nc, subj, "").Data, &stats); err != nil {
		t.Fatal(err)
	}
	seen := false
	for _, ep := range stats.Endpoints {
		var d bus.EndpointData
		if err := json.Unmarshal(ep.Data, &d); err != nil {
			t.Fatal(err)
		}
		if d.LastError != "" {
			seen = true
			if len(d.LastError) > 1100 {
				t.Errorf("%s: last error of %d bytes", ep.Subject, len(d.LastError))
			}
		}
	}
	if !seen {
		t.Error("no endpoint shows its last error")
	}
}
