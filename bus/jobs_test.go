package bus_test

import (
	"context"
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap/zaptest"

	"github.com/pyfleet/pyfleet/bus"
	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/protocol"
)

// jobHandler is a call.Handler for jobs: it counts runs per request id (the
// job id, when the job names no request id) and can fail on purpose.
type jobHandler struct {
	failFirst int // "flaky" fails this many times per job, then succeeds

	mu        sync.Mutex
	runs      map[string]int
	active    int
	maxActive int
	cancelled int // calls of forever that ended by their context
}

func (h *jobHandler) Functions() []call.Function {
	return []call.Function{{Name: "echo"}, {Name: "flaky"}, {Name: "fail"}, {Name: "bad"}, {Name: "sleep"}, {Name: "count", Stream: true},
		{Name: "forever", Stream: true}, {Name: "big"}, {Name: "quote"}}
}

func (h *jobHandler) Call(ctx context.Context, req *call.Request, emit call.Emit) (call.Result, error) {
	h.mu.Lock()
	if h.runs == nil {
		h.runs = map[string]int{}
	}
	h.runs[req.RequestID]++
	n := h.runs[req.RequestID]
	h.active++
	h.maxActive = max(h.maxActive, h.active)
	h.mu.Unlock()
	if req.Admitted != nil {
		req.Admitted() // slots counts the call now, as pool.Pool.Idle does
	}
	defer func() {
		h.mu.Lock()
		h.active--
		h.mu.Unlock()
	}()
	switch req.Function {
	case "echo":
		return call.Result{Worker: "w1", Data: req.Payload}, nil
	case "flaky":
		if n <= h.failFirst {
			return call.Result{}, &call.Error{Code: call.CodeFailed, Type: "ConnectionError", Message: "try " + strconv.Itoa(n), Worker: "w1"}
		}
		return call.Result{Worker: "w1", Data: []byte(`"ok"`)}, nil
	case "fail":
		return call.Result{}, &call.Error{Code: call.CodeFailed, Type: "ValueError", Message: "always " + strconv.Itoa(n), Worker: "w1"}
	case "bad":
		return call.Result{}, &call.Error{Code: call.CodeBadRequest, Type: "BadRequest", Message: "no good"}
	case "sleep":
		ms, _ := strconv.Atoi(string(req.Payload))
		select {
		case <-time.After(time.Duration(ms) * time.Millisecond):
			return call.Result{Worker: "w1", Data: []byte("null")}, nil
		case <-ctx.Done():
			return call.Result{}, ctx.Err()
		}
	case "forever":
		// Streams until told to stop, then waits for its context as a
		// worker's generator would wait to be cancelled.
		item := []byte(`"` + strings.Repeat("x", 998) + `"`)
		for emit(call.Chunk{Worker: "w3", Data: item}) == nil {
		}
		<-ctx.Done()
		h.mu.Lock()
		h.cancelled++
		h.mu.Unlock()
		return call.Result{}, ctx.Err()
	case "big":
		n, _ := strconv.Atoi(string(req.Payload))
		return call.Result{Worker: "w1", Data: []byte(`"` + strings.Repeat("b", n) + `"`)}, nil
	case "quote":
		// Like a Python function whose BadRequest quotes its payload.
		return call.Result{}, &call.Error{Code: call.CodeBadRequest, Type: "BadRequest", Message: "want a number, got " + string(req.Payload) + string(req.Payload), Worker: "w1"}
	case "count":
		for i := range 3 {
			if err := emit(call.Chunk{Worker: "w2", Data: []byte(strconv.Itoa(i))}); err != nil {
				return call.Result{}, err
			}
		}
		return call.Result{}, nil
	}
	return call.Result{}, call.Errorf(call.CodeNotFound, "NotFound", "%s", req.Function)
}

func (h *jobHandler) runsOf(id string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.runs[id]
}

func (h *jobHandler) total() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, r := range h.runs {
		n += r
	}
	return n
}

// slots is a fake pool's idle capacity: size less the calls in h.
func (h *jobHandler) slots(size int) func() int {
	return func() int {
		h.mu.Lock()
		defer h.mu.Unlock()
		return size - h.active
	}
}

func MustJobs(t *testing.T, nc *nats.Conn, h *jobHandler, mod ...func(*bus.JobsConfig)) *bus.Jobs {
	t.Helper()
	cfg := bus.JobsConfig{Pool: "p", Node: "n1", Capacity: h.slots(4), FetchWait: 200 * time.Millisecond, AckWait: 2 * time.Second}
	for _, f := range mod {
		f(&cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	j, err := bus.StartJobs(ctx, nc, cfg, h, zaptest.NewLogger(t).Named(cfg.Node))
	if err != nil {
		t.Fatalf("StartJobs: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := j.Stop(ctx); err != nil {
			t.Errorf("Jobs.Stop: %v", err)
		}
	})
	return j
}

func submit(t *testing.T, js jetstream.JetStream, function, id, body string, hdr ...string) *jetstream.PubAck {
	t.Helper()
	m := nats.NewMsg("pyfleet.job.p." + function)
	m.Data = []byte(body)
	if id != "" {
		m.Header.Set(protocol.HeaderMsgID, id)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		m.Header.Set(hdr[i], hdr[i+1])
	}
	ack, err := js.PublishMsg(context.Background(), m)
	if err != nil {
		t.Fatalf("submit %s: %v", function, err)
	}
	return ack
}

// mustSub subscribes and makes sure the server knows before returning, since
// what it waits for may come over another connection.
func mustSub(t *testing.T, nc *nats.Conn, subject string) *nats.Subscription {
	t.Helper()
	sub, err := nc.SubscribeSync(subject)
	if err == nil {
		err = nc.Flush()
	}
	if err != nil {
		t.Fatal(err)
	}
	return sub
}

// next waits for the next message of sub.
func next(t *testing.T, sub *nats.Subscription, within time.Duration) *nats.Msg {
	t.Helper()
	m, err := sub.NextMsg(within)
	if err != nil {
		t.Fatalf("waiting on %s: %v", sub.Subject, err)
	}
	return m
}

func jobsSetup(t *testing.T) (*nats.Conn, jetstream.JetStream) {
	srv := MustServer(t)
	nc := MustConn(t, srv)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return nc, js
}

// eventually polls cond for up to 10 s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(10 * time.Second); !cond(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("never: %s", what)
		}
	}
}

func streamMsgs(t *testing.T, js jetstream.JetStream, name string) uint64 {
	t.Helper()
	s, err := js.Stream(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Msgs
}

func TestEnsureStreams(t *testing.T) {
	nc, js := jobsSetup(t)
	// An operator's own settings survive.
	if _, err := js.CreateStream(context.Background(), jetstream.StreamConfig{
		Name: "PYFLEET_RESULTS", Subjects: []string{"pyfleet.result.>"}, MaxAge: time.Hour,
	}); err != nil {
		t.Fatal(err)
	}
	for range 2 { // the second time finds them all
		if err := bus.EnsureStreams(context.Background(), nc, "", zaptest.NewLogger(t)); err != nil {
			t.Fatalf("EnsureStreams: %v", err)
		}
	}
	want := map[string]func(jetstream.StreamConfig) bool{
		"PYFLEET_JOBS": func(c jetstream.StreamConfig) bool {
			return c.Retention == jetstream.WorkQueuePolicy && c.Storage == jetstream.FileStorage &&
				c.Duplicates == 2*time.Minute && c.Subjects[0] == "pyfleet.job.>"
		},
		"PYFLEET_RESULTS": func(c jetstream.StreamConfig) bool { return c.MaxAge == time.Hour },
		"PYFLEET_DEAD":    func(c jetstream.StreamConfig) bool { return c.Subjects[0] == "pyfleet.dead.>" },
		"PYFLEET_EVENTS": func(c jetstream.StreamConfig) bool {
			return c.MaxAge == 24*time.Hour && c.Subjects[0] == "pyfleet.evt.>"
		},
	}
	for name, ok := range want {
		s, err := js.Stream(context.Background(), name)
		if err != nil {
			t.Fatalf("stream %s: %v", name, err)
		}
		if !ok(s.CachedInfo().Config) {
			t.Errorf("stream %s config %+v", name, s.CachedInfo().Config)
		}
	}
	if got := bus.Streams("acme.pf"); got.Jobs != "ACME_PF_JOBS" {
		t.Errorf("Streams(acme.pf) = %+v", got)
	}
}

func TestJobResultStoredAndForwarded(t *testing.T) {
	nc, js := jobsSetup(t)
	h := &jobHandler{}
	MustJobs(t, nc, h)
	inbox := mustSub(t, nc, "my.results")
	submit(t, js, "echo", "j1", `{"x":1}`, protocol.HeaderReplyTo, "my.results")
	m := next(t, inbox, 10*time.Second)
	if string(m.Data) != `{"x":1}` {
		t.Errorf("forwarded body %q", m.Data)
	}
	for k, want := range map[string]string{protocol.HeaderStatus: "ok", protocol.HeaderJobID: "j1", protocol.HeaderNode: "n1", protocol.HeaderWorker: "w1"} {
		if got := m.Header.Get(k); got != want {
			t.Errorf("forwarded %s = %q, want %q", k, got, want)
		}
	}
	results, _ := js.Stream(context.Background(), "PYFLEET_RESULTS")
	stored, err := results.GetLastMsgForSubject(context.Background(), "pyfleet.result.p.j1")
	if err != nil {
		t.Fatalf("stored result: %v", err)
	}
	if string(stored.Data) != `{"x":1}` || stored.Header.Get(protocol.HeaderStatus) != "ok" || stored.Header.Get(protocol.HeaderJobID) != "j1" {
		t.Errorf("stored result %q %v", stored.Data, stored.Header)
	}
	eventually(t, "job acked", func() bool { return streamMsgs(t, js, "PYFLEET_JOBS") == 0 })

	// Without Nats-Msg-Id the stream sequence is the job id.
	ack := submit(t, js, "count", "", `null`, protocol.HeaderReplyTo, "my.results")
	m = next(t, inbox, 10*time.Second)
	if id := strconv.FormatUint(ack.Sequence, 10); m.Header.Get(protocol.HeaderJobID) != id {
		t.Errorf("job id %q, want the sequence %s", m.Header.Get(protocol.HeaderJobID), id)
	}
	if string(m.Data) != "[0,1,2]" || m.Header.Get(protocol.HeaderWorker) != "w2" {
		t.Errorf("streamed job result %q %v", m.Data, m.Header)
	}
}

func TestJobDedup(t *testing.T) {
	nc, js := jobsSetup(t)
	h := &jobHandler{}
	if err := bus.EnsureStreams(context.Background(), nc, "", nil); err != nil {
		t.Fatal(err)
	}
	if ack := submit(t, js, "echo", "same", `1`); ack.Duplicate {
		t.Fatal("first submission is a duplicate")
	}
	if ack := submit(t, js, "echo", "same", `2`); !ack.Duplicate {
		t.Error("second submission with the same id not dropped")
	}
	MustJobs(t, nc, h)
	eventually(t, "job done", func() bool { return streamMsgs(t, js, "PYFLEET_JOBS") == 0 })
	time.Sleep(200 * time.Millisecond)
	if n := h.runsOf("same"); n != 1 {
		t.Errorf("job ran %d times", n)
	}
}

func TestStoredResultNotRunAgain(t *testing.T) {
	nc, js := jobsSetup(t)
	if err := bus.EnsureStreams(context.Background(), nc, "", nil); err != nil {
		t.Fatal(err)
	}
	// A node stored this result and died before its ack.
	done := nats.NewMsg("pyfleet.result.p.j2")
	done.Header.Set(protocol.HeaderStatus, "ok")
	done.Header.Set(protocol.HeaderJobID, "j2")
	done.Header.Set(protocol.HeaderFunction, "echo")
	done.Data = []byte(`"earlier"`)
	if _, err := js.PublishMsg(context.Background(), done); err != nil {
		t.Fatal(err)
	}
	inbox := mustSub(t, nc, "my.results")
	submit(t, js, "echo", "j2", `"again"`, protocol.HeaderReplyTo, "my.results")
	h := &jobHandler{}
	MustJobs(t, nc, h)
	if m := next(t, inbox, 10*time.Second); string(m.Data) != `"earlier"` {
		t.Errorf("forwarded %q, want the stored result", m.Data)
	}
	eventually(t, "job acked", func() bool { return streamMsgs(t, js, "PYFLEET_JOBS") == 0 })
	if n := h.total(); n != 0 {
		t.Errorf("handler ran %d times", n)
	}
}

func TestJobFailsThenSucceeds(t *testing.T) {
	nc, js := jobsSetup(t)
	h := &jobHandler{failFirst: 2}
	MustJobs(t, nc, h, func(c *bus.JobsConfig) { c.BackOff = []time.Duration{50 * time.Millisecond} })
	inbox := mustSub(t, nc, "my.results")
	submit(t, js, "flaky", "j3", `{}`, protocol.HeaderReplyTo, "my.results")
	m := next(t, inbox, 10*time.Second)
	if m.Header.Get(protocol.HeaderStatus) != "ok" || string(m.Data) != `"ok"` {
		t.Errorf("result %q %v", m.Data, m.Header)
	}
	if n := h.runsOf("j3"); n != 3 {
		t.Errorf("ran %d times, want 3", n)
	}
	if n := streamMsgs(t, js, "PYFLEET_DEAD"); n != 0 {
		t.Errorf("%d dead letters", n)
	}
}

func TestJobAlwaysFailsToDeadLetter(t *testing.T) {
	nc, js := jobsSetup(t)
	h := &jobHandler{}
	dead := mustSub(t, nc, "pyfleet.dead.>")
	inbox := mustSub(t, nc, "my.results")
	MustJobs(t, nc, h, func(c *bus.JobsConfig) {
		c.MaxDeliver = 3
		c.BackOff = []time.Duration{10 * time.Millisecond}
	})
	submit(t, js, "fail", "j4", `{"a":1}`, protocol.HeaderReplyTo, "my.results")
	m := next(t, dead, 10*time.Second)
	if m.Subject != "pyfleet.dead.p.fail" {
		t.Errorf("dead letter on %s", m.Subject)
	}
	for k, want := range map[string]string{protocol.HeaderStatus: "error", protocol.HeaderErrorCode: "500", protocol.HeaderError: "always 3", protocol.HeaderJobID: "j4"} {
		if got := m.Header.Get(k); got != want {
			t.Errorf("dead letter %s = %q, want %q", k, got, want)
		}
	}
	var body protocol.DeadLetter
	if err := json.Unmarshal(m.Data, &body); err != nil {
		t.Fatal(err)
	}
	if body.Error.Type != "ValueError" || body.Job.ID != "j4" || body.Job.Deliveries != 3 || string(body.Job.Payload) != `{"a":1}` {
		t.Errorf("dead letter body %s", m.Data)
	}
	if e := protocol.ReplyError(m.Header, m.Data); e == nil || e.Message != "always 3" {
		t.Errorf("ReplyError(dead letter) = %v", e)
	}
	// Whoever waits for the job learns how it ended.
	if r := next(t, inbox, 5*time.Second); protocol.ReplyError(r.Header, r.Data) == nil || r.Header.Get(protocol.HeaderJobID) != "j4" {
		t.Errorf("forwarded %q %v, want the error", r.Data, r.Header)
	}
	if n := h.runsOf("j4"); n != 3 {
		t.Errorf("ran %d times, want 3", n)
	}
	eventually(t, "job removed", func() bool { return streamMsgs(t, js, "PYFLEET_JOBS") == 0 })
	if n := streamMsgs(t, js, "PYFLEET_DEAD"); n != 1 {
		t.Errorf("%d dead letters stored", n)
	}
}

func TestJobThatCanNeverSucceed(t *testing.T) {
	nc, js := jobsSetup(t)
	h := &jobHandler{}
	dead := mustSub(t, nc, "pyfleet.dead.>")
	MustJobs(t, nc, h)
	for _, c := range []struct {
		function, id, body string
		hdr                []string
		code, runs         int
	}{
		{"echo", "badjson", `{`, nil, 400, 0},
		{"nosuch", "unknown", `{}`, nil, 404, 0},
		{"echo", "badtimeout", `{}`, []string{protocol.HeaderTimeout, "soon"}, 400, 0},
		{"bad", "raises", `{}`, nil, 400, 1},
		{"echo", "has space", `{}`, nil, 400, 0},
	} {
		submit(t, js, c.function, c.id, c.body, c.hdr...)
		m := next(t, dead, 10*time.Second)
		if m.Header.Get(protocol.HeaderErrorCode) != strconv.Itoa(c.code) || m.Header.Get(protocol.HeaderJobID) != c.id {
			t.Errorf("%s: dead letter %s %v", c.id, m.Data, m.Header)
		}
		if n := h.runsOf(c.id); n != c.runs {
			t.Errorf("%s: ran %d times, want %d", c.id, n, c.runs)
		}
	}
}

func TestLongJobKeptByInProgress(t *testing.T) {
	nc, js := jobsSetup(t)
	h := &jobHandler{}
	MustJobs(t, nc, h, func(c *bus.JobsConfig) { c.AckWait = 300 * time.Millisecond })
	inbox := mustSub(t, nc, "my.results")
	submit(t, js, "sleep", "long", `1500`, protocol.HeaderReplyTo, "my.results")
	if m := next(t, inbox, 10*time.Second); m.Header.Get(protocol.HeaderStatus) != "ok" {
		t.Errorf("result %v", m.Header)
	}
	time.Sleep(500 * time.Millisecond) // a redelivery would show now
	if n := h.runsOf("long"); n != 1 {
		t.Errorf("ran %d times, want 1: the lease was lost", n)
	}
}

func TestJobsRespectCapacity(t *testing.T) {
	nc, js := jobsSetup(t)
	h := &jobHandler{}
	j := MustJobs(t, nc, h, func(c *bus.JobsConfig) { c.Capacity = h.slots(2) })
	const n = 12
	inbox := mustSub(t, nc, "my.results")
	for i := range n {
		submit(t, js, "sleep", "c"+strconv.Itoa(i), `100`, protocol.HeaderReplyTo, "my.results")
	}
	cons, err := js.Consumer(context.Background(), "PYFLEET_JOBS", "pyfleet_p")
	if err != nil {
		t.Fatal(err)
	}
	for got := 0; got < n; {
		if _, err := inbox.NextMsg(50 * time.Millisecond); err == nil {
			got++
		} else if !errors.Is(err, nats.ErrTimeout) {
			t.Fatal(err)
		}
		info, err := cons.Info(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		// Delivered and not yet acked: the 2 that run, and at most 2
		// that ran and are storing their result; never the 12 queued.
		if info.NumAckPending > 4 || j.Running() > 4 {
			t.Fatalf("%d jobs pending ack, %d held, with capacity 2", info.NumAckPending, j.Running())
		}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.maxActive != 2 {
		t.Errorf("at most %d jobs ran at once, want 2", h.maxActive)
	}
}

// TestJobOfStoppedNodeDeadLettered covers a job whose last delivery ends
// with its node: no node settles it, the server gives up, and its advisory
// makes another node dead-letter it.
func TestJobOfStoppedNodeDeadLettered(t *testing.T) {
	srv := MustServer(t)
	nc := MustConn(t, srv)
	js, _ := jetstream.New(nc)
	dead := mustSub(t, nc, "pyfleet.dead.>")
	h := &jobHandler{}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	j, err := bus.StartJobs(ctx, MustConn(t, srv), bus.JobsConfig{Pool: "p", Node: "n1", MaxDeliver: 1, Capacity: h.slots(1), FetchWait: 200 * time.Millisecond}, h, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	submit(t, js, "sleep", "cut", `10000`)
	eventually(t, "job started", func() bool { return h.runsOf("cut") == 1 })
	// Another node of the pool: its pulls make the server notice that the
	// job handed back has used its deliveries, and it hears the advisory.
	other := &jobHandler{}
	MustJobs(t, MustConn(t, srv), other, func(c *bus.JobsConfig) { c.Node, c.MaxDeliver = "n2", 1 })
	stopCtx, stopCancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer stopCancel()
	if err := j.Stop(stopCtx); err == nil || !strings.Contains(err.Error(), "1 jobs still running") {
		t.Errorf("Stop = %v", err)
	}
	m := next(t, dead, 10*time.Second)
	if m.Subject != "pyfleet.dead.p.sleep" || m.Header.Get(protocol.HeaderJobID) != "cut" {
		t.Errorf("dead letter %s %v", m.Subject, m.Header)
	}
	if e := protocol.ReplyError(m.Header, m.Data); e == nil || e.Type != call.TypeDeliveryLimit {
		t.Errorf("dead letter error %v", e)
	}
	eventually(t, "job removed", func() bool { return streamMsgs(t, js, "PYFLEET_JOBS") == 0 })
	if err := j.Stop(context.Background()); err != nil {
		t.Errorf("second Stop: %v", err)
	}
	if n := other.total(); n != 0 {
		t.Errorf("the other node ran the job %d times", n)
	}
}

func TestStartJobsValidates(t *testing.T) {
	nc, _ := jobsSetup(t)
	for _, cfg := range []bus.JobsConfig{
		{Pool: "p", Node: "n"},
		{Pool: "a.b", Node: "n", Capacity: func() int { return 1 }},
		{Pool: "p", Node: "n", Capacity: func() int { return 1 }, MaxDeliver: -3},
	} {
		if _, err := bus.StartJobs(context.Background(), nc, cfg, &jobHandler{}, nil); err == nil {
			t.Errorf("StartJobs(%+v) accepted", cfg)
		}
	}
}

func TestConsumerRecreated(t *testing.T) {
	nc, js := jobsSetup(t)
	h := &jobHandler{}
	MustJobs(t, nc, h)
	if err := js.DeleteConsumer(context.Background(), "PYFLEET_JOBS", "pyfleet_p"); err != nil {
		t.Fatal(err)
	}
	inbox := mustSub(t, nc, "my.results")
	submit(t, js, "echo", "after", `1`, protocol.HeaderReplyTo, "my.results")
	if m := next(t, inbox, 15*time.Second); string(m.Data) != "1" {
		t.Errorf("result %q", m.Data)
	}
}

// readDead decodes a dead letter's body.
func readDead(t *testing.T, m *nats.Msg) protocol.DeadLetter {
	t.Helper()
	var d protocol.DeadLetter
	if err := json.Unmarshal(m.Data, &d); err != nil {
		t.Fatalf("dead letter body %.200q: %v", m.Data, err)
	}
	return d
}

// storedResult returns the stored result of job id in pool p, or nil.
func storedResult(t *testing.T, js jetstream.JetStream, id string) *jetstream.RawStreamMsg {
	t.Helper()
	s, err := js.Stream(context.Background(), "PYFLEET_RESULTS")
	if err != nil {
		t.Fatal(err)
	}
	m, err := s.GetLastMsgForSubject(context.Background(), "pyfleet.result.p."+id)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// waitStored waits for the stored result of job id in pool p.
func waitStored(t *testing.T, js jetstream.JetStream, id string) *jetstream.RawStreamMsg {
	t.Helper()
	var r *jetstream.RawStreamMsg
	eventually(t, "result of "+id+" stored", func() bool {
		r = storedResult(t, js, id)
		return r != nil
	})
	return r
}

// TestJobBadHeadersDeadLetteredAtOnce: a job whose headers the node could
// not carry (not UTF-8, over MaxHeaderValue, a control character), whose
// Pyfleet-Timeout is bad or over MaxTimeout, or whose body is not JSON is
// dead-lettered on its first delivery with a 400 that names the problem,
// and never reaches the handler. A bad Nats-Msg-Id is replaced by the
// stream sequence in everything the node writes.
func TestJobBadHeadersDeadLetteredAtOnce(t *testing.T) {
	nc, js := jobsSetup(t)
	h := &jobHandler{}
	dead := mustSub(t, nc, "pyfleet.dead.>")
	MustJobs(t, nc, h, func(c *bus.JobsConfig) { c.MaxTimeout = time.Minute })
	type badJob struct {
		name, header, value, body, naming string
	}
	var cases []badJob
	for _, name := range []string{protocol.HeaderRequestID, protocol.HeaderSession, protocol.HeaderTimeout, protocol.HeaderHeartbeat, protocol.HeaderReplyTo, protocol.HeaderMsgID} {
		for _, fault := range []struct{ what, value string }{
			{"not UTF-8", "a\xff\xfeb"},
			{"too long", strings.Repeat("a", protocol.MaxHeaderValue+1)},
			{"control character", "a\x01b"},
			{"DEL", "a\x7fb"},
		} {
			cases = append(cases, badJob{name + " " + fault.what, name, fault.value, `{}`, "header " + name})
		}
	}
	cases = append(cases,
		badJob{"timeout over MaxTimeout", protocol.HeaderTimeout, "60001", `{}`, "over this node's limit of 60000"},
		badJob{"timeout not a number", protocol.HeaderTimeout, "soon", `{}`, "header " + protocol.HeaderTimeout},
		badJob{"timeout that would wrap", protocol.HeaderTimeout, "9223372036854775807", `{}`, "header " + protocol.HeaderTimeout},
		badJob{"malformed JSON", "", "", `{"a":`, "malformed JSON"},
	)
	for i, c := range cases {
		id := "bad-" + strconv.Itoa(i)
		var hdr []string
		if c.header != "" {
			hdr = []string{c.header, c.value}
		}
		if c.header == protocol.HeaderMsgID {
			id = "" // the header is the id
		}
		ack := submit(t, js, "echo", id, c.body, hdr...)
		if id == "" {
			id = strconv.FormatUint(ack.Sequence, 10)
		}
		m := next(t, dead, 10*time.Second)
		d := readDead(t, m)
		if d.Error.Code != 400 || !strings.Contains(d.Error.Message, c.naming) || d.Job.Deliveries != 1 || d.Job.Seq != ack.Sequence {
			t.Errorf("%s: dead letter %s; want a 400 naming %q on the first delivery", c.name, m.Data, c.naming)
		}
		if got := m.Header.Get(protocol.HeaderJobID); got != id || d.Job.ID != id {
			t.Errorf("%s: dead letter of job %q (body %q), want %q", c.name, got, d.Job.ID, id)
		}
		if c.header == protocol.HeaderMsgID && !strings.Contains(d.Error.Message, "named by its stream sequence "+id) {
			t.Errorf("%s: the dead letter does not say the job was renamed: %q", c.name, d.Error.Message)
		}
		for k, vs := range m.Header {
			for _, v := range vs {
				if len(v) > 1100 || strings.ContainsAny(v, "\xff\x01\x7f") {
					t.Errorf("%s: dead letter header %s = %q carries the bad value", c.name, k, v)
				}
			}
		}
		// The job ended: its error is its stored result (stored just
		// after the dead letter).
		if r := waitStored(t, js, id); r.Header.Get(protocol.HeaderStatus) != protocol.StatusError {
			t.Errorf("%s: stored result %v, want the error", c.name, r.Header)
		}
	}
	eventually(t, "every job removed", func() bool { return streamMsgs(t, js, "PYFLEET_JOBS") == 0 })
	time.Sleep(300 * time.Millisecond) // a redelivery would show now
	if n := h.total(); n != 0 {
		t.Errorf("the handler ran %d of the bad jobs", n)
	}
	if n := streamMsgs(t, js, "PYFLEET_DEAD"); n != uint64(len(cases)) {
		t.Errorf("%d dead letters for %d bad jobs", n, len(cases))
	}
	// A good job with the largest allowed timeout still runs.
	inbox := mustSub(t, nc, "my.results")
	submit(t, js, "echo", "good", `{"ok":1}`, protocol.HeaderTimeout, "60000", protocol.HeaderReplyTo, "my.results")
	if m := next(t, inbox, 10*time.Second); string(m.Data) != `{"ok":1}` {
		t.Errorf("good job result %q %v", m.Data, m.Header)
	}
}

// TestJobReplyToRestricted: a Pyfleet-Reply-To into the pool's own result,
// job, event or dead-letter subjects, into $JS, $KV, $O or $SYS, or that is
// not a plain subject is a 400 dead-lettered at once; nothing is sent there.
func TestJobReplyToRestricted(t *testing.T) {
	nc, js := jobsSetup(t)
	h := &jobHandler{}
	dead := mustSub(t, nc, "pyfleet.dead.>")
	MustJobs(t, nc, h)
	watch := mustSub(t, nc, ">") // everything published, to see where results go
	for i, to := range []string{
		"pyfleet.result.p.victim", "pyfleet.result.other.victim", "pyfleet.job.p.echo", "pyfleet.evt.p.n1.ready",
		"pyfleet.dead.p.echo", "pyfleet.result", "$JS.API.STREAM.DELETE.PYFLEET_JOBS", "$KV.cfg.key", "$O.store.x",
		"$SYS.REQ.SERVER.PING", "a..b", ".a", "a.", "a.*", "a.>", "*", "a b", "a\tb",
	} {
		id := "rt-" + strconv.Itoa(i)
		submit(t, js, "echo", id, `{"forged":true}`, protocol.HeaderReplyTo, to)
		m := next(t, dead, 10*time.Second)
		d := readDead(t, m)
		if d.Error.Code != 400 || !strings.Contains(d.Error.Message, protocol.HeaderReplyTo) || d.Job.ID != id || d.Job.Deliveries != 1 {
			t.Errorf("Reply-To %q: dead letter %s, want a 400 naming %s", to, m.Data, protocol.HeaderReplyTo)
		}
	}
	if n := h.total(); n != 0 {
		t.Errorf("the handler ran %d jobs with a forbidden Reply-To", n)
	}
	if r := storedResult(t, js, "victim"); r != nil {
		t.Errorf("a result was stored for the victim: %v %s", r.Header, r.Data)
	}
	if _, err := js.Stream(context.Background(), "PYFLEET_JOBS"); err != nil {
		t.Errorf("PYFLEET_JOBS: %v", err)
	}
	// Only the node's own traffic: no message carries the job's body.
	for {
		m, err := watch.NextMsg(200 * time.Millisecond)
		if err != nil {
			break
		}
		if strings.Contains(string(m.Data), "forged") && !strings.HasPrefix(m.Subject, "pyfleet.job.") &&
			!strings.HasPrefix(m.Subject, "pyfleet.dead.") && !strings.HasPrefix(m.Subject, "$JS.API.") {
			t.Errorf("the job's body was sent to %s", m.Subject)
		}
	}
}

// TestStoredResultOfAnotherJobIgnored: a redelivered job trusts a stored
// result only when it names the job and its function; another is ignored
// and the job runs (its own result replaces the stranger).
func TestStoredResultOfAnotherJobIgnored(t *testing.T) {
	nc, js := jobsSetup(t)
	if err := bus.EnsureStreams(context.Background(), nc, "", nil); err != nil {
		t.Fatal(err)
	}
	forged := map[string][2]string{ // job id: the stored result's job id and function
		"f1": {"someone-else", "echo"},
		"f2": {"f2", "fail"},
		"f3": {"", ""},
	}
	for id, names := range forged {
		m := nats.NewMsg("pyfleet.result.p." + id)
		m.Header.Set(protocol.HeaderStatus, protocol.StatusOK)
		if names[0] != "" {
			m.Header.Set(protocol.HeaderJobID, names[0])
			m.Header.Set(protocol.HeaderFunction, names[1])
		}
		m.Data = []byte(`"forged"`)
		if _, err := js.PublishMsg(context.Background(), m); err != nil {
			t.Fatal(err)
		}
	}
	inbox := mustSub(t, nc, "my.results")
	h := &jobHandler{}
	MustJobs(t, nc, h)
	for id := range forged {
		submit(t, js, "echo", id, `"real"`, protocol.HeaderReplyTo, "my.results")
	}
	for range forged {
		if m := next(t, inbox, 10*time.Second); string(m.Data) != `"real"` {
			t.Errorf("job %s forwarded %q, want its own result", m.Header.Get(protocol.HeaderJobID), m.Data)
		}
	}
	for id := range forged {
		if n := h.runsOf(id); n != 1 {
			t.Errorf("job %s ran %d times, want 1", id, n)
		}
		r := storedResult(t, js, id)
		if r == nil || string(r.Data) != `"real"` || r.Header.Get(protocol.HeaderJobID) != id || r.Header.Get(protocol.HeaderFunction) != "echo" {
			t.Errorf("job %s stored result %v", id, r)
		}
	}
}

// TestStreamedJobOverMaxResultBytes: a generator that never ends is stopped
// once its items pass MaxResultBytes: the call is cancelled and the job is
// dead-lettered with a 413 on its first delivery, not redelivered.
func TestStreamedJobOverMaxResultBytes(t *testing.T) {
	nc, js := jobsSetup(t)
	h := &jobHandler{}
	dead := mustSub(t, nc, "pyfleet.dead.>")
	inbox := mustSub(t, nc, "my.results")
	MustJobs(t, nc, h, func(c *bus.JobsConfig) { c.MaxResultBytes = 10_000 })
	// A deadline far off: only the limit can end it within the wait below.
	submit(t, js, "forever", "endless", `{}`, protocol.HeaderTimeout, "600000", protocol.HeaderReplyTo, "my.results")
	m := next(t, dead, 10*time.Second)
	d := readDead(t, m)
	if d.Error.Code != 413 || d.Error.Type != call.TypeTooLarge || !strings.Contains(d.Error.Message, "over the limit of 10000 bytes") ||
		d.Job.Deliveries != 1 || m.Header.Get(protocol.HeaderWorker) != "w3" {
		t.Errorf("dead letter %v %s", m.Header, m.Data)
	}
	if r := next(t, inbox, 5*time.Second); protocol.ReplyError(r.Header, r.Data) == nil || protocol.ReplyError(r.Header, r.Data).Code != 413 {
		t.Errorf("forwarded %v %s, want the 413", r.Header, r.Data)
	}
	eventually(t, "call cancelled", func() bool {
		h.mu.Lock()
		defer h.mu.Unlock()
		return h.cancelled == 1
	})
	eventually(t, "job removed", func() bool { return streamMsgs(t, js, "PYFLEET_JOBS") == 0 })
	time.Sleep(300 * time.Millisecond)
	if n := h.runsOf("endless"); n != 1 {
		t.Errorf("ran %d times, want 1", n)
	}

	// Within the limit a streamed job succeeds as before.
	submit(t, js, "count", "three", `null`, protocol.HeaderReplyTo, "my.results")
	if r := next(t, inbox, 10*time.Second); string(r.Data) != "[0,1,2]" {
		t.Errorf("count result %q", r.Data)
	}
}

// TestLargeResultOverMaxResultBytes: a plain result over MaxResultBytes, and
// by default one over the max payload, is a 413 dead-lettered at once.
func TestLargeResultOverMaxResultBytes(t *testing.T) {
	for _, c := range []struct {
		name  string
		limit int
		size  int
		want  string
	}{
		{"MaxResultBytes", 5000, 6000, "over the limit of 5000 bytes"},
		{"max payload", 0, 2 << 20, "over the limit of 1048576 bytes"},
		{"streamed, max payload", 0, -1, "over the limit of 1048576 bytes"},
	} {
		t.Run(c.name, func(t *testing.T) {
			nc, js := jobsSetup(t)
			h := &jobHandler{}
			dead := mustSub(t, nc, "pyfleet.dead.>")
			MustJobs(t, nc, h, func(cfg *bus.JobsConfig) { cfg.MaxResultBytes = c.limit })
			if c.size < 0 {
				submit(t, js, "forever", "large", `{}`)
			} else {
				submit(t, js, "big", "large", strconv.Itoa(c.size))
			}
			m := next(t, dead, 10*time.Second)
			d := readDead(t, m)
			if d.Error.Code != 413 || !strings.Contains(d.Error.Message, c.want) || d.Job.Deliveries != 1 {
				t.Errorf("dead letter %s, want a 413 %q", m.Data, c.want)
			}
			if r := waitStored(t, js, "large"); protocol.ReplyError(r.Header, r.Data).Code != 413 {
				t.Errorf("stored result %v, want the 413", r.Header)
			}
			eventually(t, "job removed", func() bool { return streamMsgs(t, js, "PYFLEET_JOBS") == 0 })
			if n := h.runsOf("large"); n != 1 {
				t.Errorf("ran %d times, want 1", n)
			}
		})
	}
}

// TestDeadLetterOfOversizedJob: when the job's payload and its error (here
// quoting the payload twice) make a dead letter over the max payload, the
// dead letter holds the start of the payload and its size, and a shortened
// error; the error result is shortened too. Nothing is retried.
func TestDeadLetterOfOversizedJob(t *testing.T) {
	nc, js := jobsSetup(t)
	h := &jobHandler{}
	dead := mustSub(t, nc, "pyfleet.dead.>")
	inbox := mustSub(t, nc, "my.results")
	MustJobs(t, nc, h)
	body := `"` + strings.Repeat("p", int(nc.MaxPayload())-1000) + `"`
	ack := submit(t, js, "quote", "huge", body, protocol.HeaderReplyTo, "my.results")
	m := next(t, dead, 20*time.Second)
	d := readDead(t, m)
	if d.Error.Code != 400 || len(d.Error.Message) > 5000 || !strings.Contains(d.Error.Message, "bytes in all") {
		t.Errorf("dead letter error %d %.200q (%d bytes), want the 400, shortened", d.Error.Code, d.Error.Message, len(d.Error.Message))
	}
	if !d.Job.PayloadTruncated || d.Job.PayloadSize != len(body) || d.Job.Seq != ack.Sequence || d.Job.Payload != nil ||
		len(d.Job.PayloadBytes) == 0 || !strings.HasPrefix(body, string(d.Job.PayloadBytes)) {
		t.Errorf("dead letter job: truncated %v, size %d of %d, seq %d of %d, %d payload bytes",
			d.Job.PayloadTruncated, d.Job.PayloadSize, len(body), d.Job.Seq, ack.Sequence, len(d.Job.PayloadBytes))
	}
	t.Logf("dead letter of %d bytes keeps %d of the payload's %d bytes", len(m.Data), len(d.Job.PayloadBytes), len(body))
	r := waitStored(t, js, "huge")
	if e := protocol.ReplyError(r.Header, r.Data); e.Code != 400 || len(e.Message) > 5000 {
		t.Errorf("stored error %d of %d bytes", e.Code, len(e.Message))
	}
	if f := next(t, inbox, 5*time.Second); protocol.ReplyError(f.Header, f.Data) == nil {
		t.Errorf("forwarded %v, want the error", f.Header)
	}
	eventually(t, "job removed", func() bool { return streamMsgs(t, js, "PYFLEET_JOBS") == 0 })
	time.Sleep(300 * time.Millisecond)
	if n := h.runsOf("huge"); n != 1 {
		t.Errorf("ran %d times, want 1", n)
	}
}

// fullStream creates stream name on subject holding one message and
// refusing more, as an operator's stream with tiny limits and discard new.
func fullStream(t *testing.T, js jetstream.JetStream, name, subject string, bytes bool) {
	t.Helper()
	cfg := jetstream.StreamConfig{Name: name, Subjects: []string{subject}, Discard: jetstream.DiscardNew, MaxMsgs: 1}
	if bytes {
		cfg.MaxMsgs, cfg.MaxBytes = -1, 200
	}
	if _, err := js.CreateStream(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
	filler := strings.TrimSuffix(subject, ">") + "filler"
	if _, err := js.Publish(context.Background(), filler, []byte(strings.Repeat("f", 100))); err != nil {
		t.Fatal(err)
	}
}

// TestResultsStreamRefusesWrites: a results stream that is full with discard
// new gets the job dead-lettered at once, with an error that says the
// results stream refused the write and why; the job is not run again.
func TestResultsStreamRefusesWrites(t *testing.T) {
	for _, c := range []struct {
		name  string
		bytes bool
		why   string
	}{{"max msgs", false, "maximum messages exceeded"}, {"max bytes", true, "maximum bytes exceeded"}} {
		t.Run(c.name, func(t *testing.T) {
			nc, js := jobsSetup(t)
			fullStream(t, js, "PYFLEET_RESULTS", "pyfleet.result.>", c.bytes)
			h := &jobHandler{}
			dead := mustSub(t, nc, "pyfleet.dead.>")
			inbox := mustSub(t, nc, "my.results")
			MustJobs(t, nc, h)
			submit(t, js, "echo", "unstorable", `{"x":1}`, protocol.HeaderReplyTo, "my.results")
			m := next(t, dead, 20*time.Second)
			d := readDead(t, m)
			if d.Error.Type != call.TypeResultRefused || !strings.Contains(d.Error.Message, "results stream PYFLEET_RESULTS refused") ||
				!strings.Contains(d.Error.Message, c.why) || d.Job.Deliveries != 1 || string(d.Job.Payload) != `{"x":1}` {
				t.Errorf("dead letter %s", m.Data)
			}
			if f := next(t, inbox, 5*time.Second); protocol.ReplyError(f.Header, f.Data) == nil || protocol.ReplyError(f.Header, f.Data).Type != call.TypeResultRefused {
				t.Errorf("forwarded %v %s, want the refusal", f.Header, f.Data)
			}
			eventually(t, "job removed", func() bool { return streamMsgs(t, js, "PYFLEET_JOBS") == 0 })
			time.Sleep(300 * time.Millisecond)
			if n := h.runsOf("unstorable"); n != 1 {
				t.Errorf("ran %d times, want 1", n)
			}
		})
	}
}

// TestPermanentFailureEndsWhenNothingCanBeStored: with both the dead-letter
// and the results stream refusing writes, a job that can never succeed is
// still terminated (and its error forwarded), never redelivered; one that
// might succeed stays in the stream.
func TestPermanentFailureEndsWhenNothingCanBeStored(t *testing.T) {
	nc, js := jobsSetup(t)
	fullStream(t, js, "PYFLEET_RESULTS", "pyfleet.result.>", false)
	fullStream(t, js, "PYFLEET_DEAD", "pyfleet.dead.>", false)
	h := &jobHandler{}
	inbox := mustSub(t, nc, "my.results")
	MustJobs(t, nc, h, func(c *bus.JobsConfig) {
		c.MaxDeliver = 2
		c.BackOff = []time.Duration{10 * time.Millisecond}
	})
	submit(t, js, "bad", "doomed", `{}`, protocol.HeaderReplyTo, "my.results")
	if f := next(t, inbox, 10*time.Second); protocol.ReplyError(f.Header, f.Data) == nil || protocol.ReplyError(f.Header, f.Data).Code != 400 {
		t.Errorf("forwarded %v %s, want the 400", f.Header, f.Data)
	}
	eventually(t, "job removed", func() bool { return streamMsgs(t, js, "PYFLEET_JOBS") == 0 })
	time.Sleep(300 * time.Millisecond)
	if n := h.runsOf("doomed"); n != 1 {
		t.Errorf("ran %d times, want 1", n)
	}

	// A failure that may pass is kept: its last delivery is handed back,
	// so the job stays in the stream for an operator to see.
	submit(t, js, "fail", "kept", `{}`)
	eventually(t, "two deliveries", func() bool { return h.runsOf("kept") == 2 })
	time.Sleep(300 * time.Millisecond)
	if n := streamMsgs(t, js, "PYFLEET_JOBS"); n != 1 {
		t.Errorf("%d jobs in the stream, want the one that could not be buried", n)
	}
}
