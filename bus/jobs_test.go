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
)

// jobHandler is a call.Handler for jobs: it counts runs per request id (the
// job id, when the job names no request id) and can fail on purpose.
type jobHandler struct {
	failFirst int // "flaky" fails this many times per job, then succeeds

	mu        sync.Mutex
	runs      map[string]int
	active    int
	maxActive int
}

func (h *jobHandler) Functions() []call.Function {
	return []call.Function{{Name: "echo"}, {Name: "flaky"}, {Name: "fail"}, {Name: "bad"}, {Name: "sleep"}, {Name: "count", Stream: true}}
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
		m.Header.Set(bus.HeaderMsgID, id)
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
	submit(t, js, "echo", "j1", `{"x":1}`, bus.HeaderReplyTo, "my.results")
	m := next(t, inbox, 10*time.Second)
	if string(m.Data) != `{"x":1}` {
		t.Errorf("forwarded body %q", m.Data)
	}
	for k, want := range map[string]string{bus.HeaderStatus: "ok", bus.HeaderJobID: "j1", bus.HeaderNode: "n1", bus.HeaderWorker: "w1"} {
		if got := m.Header.Get(k); got != want {
			t.Errorf("forwarded %s = %q, want %q", k, got, want)
		}
	}
	results, _ := js.Stream(context.Background(), "PYFLEET_RESULTS")
	stored, err := results.GetLastMsgForSubject(context.Background(), "pyfleet.result.p.j1")
	if err != nil {
		t.Fatalf("stored result: %v", err)
	}
	if string(stored.Data) != `{"x":1}` || stored.Header.Get(bus.HeaderStatus) != "ok" || stored.Header.Get(bus.HeaderJobID) != "j1" {
		t.Errorf("stored result %q %v", stored.Data, stored.Header)
	}
	eventually(t, "job acked", func() bool { return streamMsgs(t, js, "PYFLEET_JOBS") == 0 })

	// Without Nats-Msg-Id the stream sequence is the job id.
	ack := submit(t, js, "count", "", `null`, bus.HeaderReplyTo, "my.results")
	m = next(t, inbox, 10*time.Second)
	if id := strconv.FormatUint(ack.Sequence, 10); m.Header.Get(bus.HeaderJobID) != id {
		t.Errorf("job id %q, want the sequence %s", m.Header.Get(bus.HeaderJobID), id)
	}
	if string(m.Data) != "[0,1,2]" || m.Header.Get(bus.HeaderWorker) != "w2" {
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
	done.Header.Set(bus.HeaderStatus, "ok")
	done.Data = []byte(`"earlier"`)
	if _, err := js.PublishMsg(context.Background(), done); err != nil {
		t.Fatal(err)
	}
	inbox := mustSub(t, nc, "my.results")
	submit(t, js, "echo", "j2", `"again"`, bus.HeaderReplyTo, "my.results")
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
	submit(t, js, "flaky", "j3", `{}`, bus.HeaderReplyTo, "my.results")
	m := next(t, inbox, 10*time.Second)
	if m.Header.Get(bus.HeaderStatus) != "ok" || string(m.Data) != `"ok"` {
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
	submit(t, js, "fail", "j4", `{"a":1}`, bus.HeaderReplyTo, "my.results")
	m := next(t, dead, 10*time.Second)
	if m.Subject != "pyfleet.dead.p.fail" {
		t.Errorf("dead letter on %s", m.Subject)
	}
	for k, want := range map[string]string{bus.HeaderStatus: "error", bus.HeaderErrorCode: "500", bus.HeaderError: "always 3", bus.HeaderJobID: "j4"} {
		if got := m.Header.Get(k); got != want {
			t.Errorf("dead letter %s = %q, want %q", k, got, want)
		}
	}
	var body bus.DeadLetter
	if err := json.Unmarshal(m.Data, &body); err != nil {
		t.Fatal(err)
	}
	if body.Error.Type != "ValueError" || body.Job.ID != "j4" || body.Job.Deliveries != 3 || string(body.Job.Payload) != `{"a":1}` {
		t.Errorf("dead letter body %s", m.Data)
	}
	if e := bus.ReplyError(m); e == nil || e.Message != "always 3" {
		t.Errorf("ReplyError(dead letter) = %v", e)
	}
	// Whoever waits for the job learns how it ended.
	if r := next(t, inbox, 5*time.Second); bus.ReplyError(r) == nil || r.Header.Get(bus.HeaderJobID) != "j4" {
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
		{"echo", "badtimeout", `{}`, []string{bus.HeaderTimeout, "soon"}, 400, 0},
		{"bad", "raises", `{}`, nil, 400, 1},
		{"echo", "has space", `{}`, nil, 400, 0},
	} {
		submit(t, js, c.function, c.id, c.body, c.hdr...)
		m := next(t, dead, 10*time.Second)
		if m.Header.Get(bus.HeaderErrorCode) != strconv.Itoa(c.code) || m.Header.Get(bus.HeaderJobID) != c.id {
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
	submit(t, js, "sleep", "long", `1500`, bus.HeaderReplyTo, "my.results")
	if m := next(t, inbox, 10*time.Second); m.Header.Get(bus.HeaderStatus) != "ok" {
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
		submit(t, js, "sleep", "c"+strconv.Itoa(i), `100`, bus.HeaderReplyTo, "my.results")
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
	if m.Subject != "pyfleet.dead.p.sleep" || m.Header.Get(bus.HeaderJobID) != "cut" {
		t.Errorf("dead letter %s %v", m.Subject, m.Header)
	}
	if e := bus.ReplyError(m); e == nil || e.Type != "DeliveryLimit" {
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
	submit(t, js, "echo", "after", `1`, bus.HeaderReplyTo, "my.results")
	if m := next(t, inbox, 15*time.Second); string(m.Data) != "1" {
		t.Errorf("result %q", m.Data)
	}
}
