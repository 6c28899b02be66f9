package test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pyfleet/pyfleet/protocol"
)

// deadWatcher collects the dead letters of pool default as they are
// published, by job id.
type deadWatcher struct {
	t   *testing.T
	mu  sync.Mutex
	got map[string][]*nats.Msg
}

func watchDead(t *testing.T, nc *nats.Conn) *deadWatcher {
	t.Helper()
	w := &deadWatcher{t: t, got: map[string][]*nats.Msg{}}
	sub, err := nc.Subscribe("pyfleet.dead.default.>", func(m *nats.Msg) {
		w.mu.Lock()
		defer w.mu.Unlock()
		id := m.Header.Get(protocol.HeaderJobID)
		w.got[id] = append(w.got[id], m)
	})
	if err == nil {
		err = nc.Flush()
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	return w
}

// wait returns the dead letter of job id, decoded, once it came.
func (w *deadWatcher) wait(id string, timeout time.Duration) (*nats.Msg, protocol.DeadLetter) {
	w.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		w.mu.Lock()
		ms := w.got[id]
		w.mu.Unlock()
		if len(ms) > 0 {
			var d protocol.DeadLetter
			if err := json.Unmarshal(ms[0].Data, &d); err != nil {
				w.t.Fatalf("dead letter of %s: %v: %.300q", id, err, ms[0].Data)
			}
			return ms[0], d
		}
		if time.Now().After(deadline) {
			w.t.Fatalf("no dead letter for job %q within %s", id, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (w *deadWatcher) count(id string) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.got[id])
}

// jobsGone waits until PYFLEET_JOBS is empty: every job was settled.
func jobsGone(t *testing.T, js jetstream.JetStream) {
	t.Helper()
	waitUntil(t, 30*time.Second, "PYFLEET_JOBS empty", func() bool {
		return streamInfo(t, js, "PYFLEET_JOBS").State.Msgs == 0
	})
}

// TestHostileJobBadHeaders: jobs whose headers are not UTF-8, too long or
// hold a control character, whose Pyfleet-Timeout is over --max-timeout,
// or whose body is not JSON are dead-lettered on their first delivery with
// a 400 naming the problem; `submit job --wait` on such a job returns that
// error; the node serves on with all its workers.
func TestHostileJobBadHeaders(t *testing.T) {
	n := startNode(t, nodeOptions{workers: 2, extra: []string{"--max-timeout", "2m"}})
	nc := n.connect()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	dead := watchDead(t, nc)
	type badJob struct {
		id, header, value, body, naming string
	}
	var jobs []badJob
	for _, h := range []string{protocol.HeaderRequestID, protocol.HeaderSession, protocol.HeaderTimeout, protocol.HeaderHeartbeat, protocol.HeaderReplyTo, protocol.HeaderMsgID} {
		for i, v := range []string{"\xff\xfe", strings.Repeat("x", protocol.MaxHeaderValue+1), "a\x01b"} {
			jobs = append(jobs, badJob{fmt.Sprintf("h-%s-%d", strings.ToLower(h), i), h, v, `{}`, "header " + h})
		}
	}
	jobs = append(jobs,
		badJob{"timeout-over-max", protocol.HeaderTimeout, "120001", `{}`, "over this node's limit of 120000"},
		badJob{"timeout-wraps", protocol.HeaderTimeout, "4294967397", `{}`, "over this node's limit of 120000"},
		badJob{"malformed-json", "", "", `{"a":`, "malformed JSON"},
	)
	for i, j := range jobs {
		m := nats.NewMsg("pyfleet.job.default.echo")
		m.Data = []byte(j.body)
		m.Header.Set(protocol.HeaderMsgID, j.id)
		if j.header != "" {
			m.Header.Set(j.header, j.value)
		}
		ack, err := js.PublishMsg(context.Background(), m)
		if err != nil {
			t.Fatalf("publish %s: %v", j.id, err)
		}
		if j.header == protocol.HeaderMsgID {
			// The node names such a job by its stream sequence.
			jobs[i].id = strconv.FormatUint(ack.Sequence, 10)
		}
	}
	for _, j := range jobs {
		_, d := dead.wait(j.id, 30*time.Second)
		if d.Error.Code != 400 || !strings.Contains(d.Error.Message, j.naming) || d.Job.Deliveries != 1 {
			t.Errorf("%s: dead letter %+v; want a 400 naming %q on the first delivery", j.id, d, j.naming)
		}
	}
	jobsGone(t, js)

	// `submit job --wait` on one of them (the same id again: not queued
	// twice) returns its error at once.
	out, errOut, code := runSubmit(t, n.url, "", "job", "--wait", "--timeout", "30s", "--id", "timeout-over-max", "echo", "{}")
	if code != 1 || !strings.Contains(errOut, "400 BadRequest: header Pyfleet-Timeout: \"120001\" milliseconds is over this node's limit of 120000") {
		t.Errorf("submit job --wait: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	time.Sleep(500 * time.Millisecond) // a redelivery would show now
	for _, j := range jobs {
		if c := dead.count(j.id); c != 1 {
			t.Errorf("%s dead-lettered %d times", j.id, c)
		}
	}
	assertStillServing(t, n, nc, 2)
}

// endlessApp serves echo and a generator that never ends.
func endlessApp(t *testing.T) string {
	t.Helper()
	path := filepath.Join(shortTempDir(t), "endless.py")
	src := `from pyfleet import App

app = App()


@app.function
def echo(payload):
    return payload


@app.function
async def forever(payload):
    item = "x" * 65536
    while True:
        yield item
`
	if err := writeFile(path, src); err != nil {
		t.Fatal(err)
	}
	return path
}

// endlessRSSBound is how far the node's peak RSS may rise above its RSS
// before the endless jobs. Each job's items are capped at the max payload
// (1 MB); what comes on top is the gRPC windows of the two workers' streams
// (pool/worker.go), garbage not yet collected and the race detector's
// shadow memory (the test binaries are built with -race): about 90 MB for
// four jobs here. Without the cap the node grew by about 170 MB a second
// (1.7 GB after 10 s, a build without -race) for the job's whole deadline.
const endlessRSSBound = 200 << 10 // kB

// TestHostileJobEndlessStream: jobs that stream without end end with 413 at
// the max payload, each on its first delivery, and are dead-lettered; the
// node's RSS stays within endlessRSSBound of where it was; `submit job
// --wait` returns the 413.
func TestHostileJobEndlessStream(t *testing.T) {
	n := startNode(t, nodeOptions{workers: 2, app: endlessApp(t)})
	nc := n.connect()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	dead := watchDead(t, nc)
	pid := n.cmd.Process.Pid
	before := int(procStatusBytes(t, pid, "VmRSS") >> 10)

	const jobs = 4
	type result struct {
		errOut string
		code   int
	}
	results := make(chan result, jobs)
	start := time.Now()
	for i := range jobs {
		go func() {
			_, errOut, code := runSubmitNoFatal(n.url, "job", "--wait", "--timeout", "60s", "--id", fmt.Sprintf("endless-%d", i), "forever", "{}")
			results <- result{errOut, code}
		}()
	}
	peakSeen := before
	for range jobs {
		var r result
	wait:
		for {
			select {
			case r = <-results:
				break wait
			case <-time.After(50 * time.Millisecond):
				peakSeen = max(peakSeen, int(procStatusBytes(t, pid, "VmRSS")>>10))
			}
		}
		if r.code != 1 || !strings.Contains(r.errOut, "413 TooLarge: streamed result is over the limit of 1048576 bytes") {
			t.Errorf("submit job --wait forever: exit %d, stderr %q; want 1 and the 413", r.code, r.errOut)
		}
	}
	took := time.Since(start)
	for i := range jobs {
		_, d := dead.wait(fmt.Sprintf("endless-%d", i), 10*time.Second)
		if d.Error.Code != 413 || d.Job.Deliveries != 1 {
			t.Errorf("dead letter %+v, want a 413 on the first delivery", d)
		}
	}
	jobsGone(t, js)
	hwm := int(procStatusBytes(t, pid, "VmHWM") >> 10)
	t.Logf("node RSS %d kB before, %d kB at most while %d endless jobs ran (%s), peak RSS of its life %d kB; bound %d kB over before",
		before, peakSeen, jobs, took.Round(time.Millisecond), hwm, endlessRSSBound)
	if hwm > before+endlessRSSBound {
		t.Errorf("node peak RSS %d kB, more than %d kB over its %d kB before the endless jobs", hwm, endlessRSSBound, before)
	}
	assertStillServing(t, n, nc, 2)
}

// TestHostileJobOversizedDeadLetter: a job of almost the max payload whose
// error quotes it (the demo's sum raises BadRequest with the payload's
// repr) has a dead letter too large to publish: it is published with the
// start of the payload and its size instead, at once, and `submit job
// --wait` returns the 400.
func TestHostileJobOversizedDeadLetter(t *testing.T) {
	n := startNode(t, nodeOptions{workers: 2})
	nc := n.connect()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	dead := watchDead(t, nc)
	body := `"` + strings.Repeat("y", 900_000) + `"`
	out, errOut, code := runSubmit(t, n.url, body, "job", "--wait", "--timeout", "60s", "--id", "huge-1", "sum", "-")
	if code != 1 || !strings.HasPrefix(errOut, "400 BadRequest: want a list of numbers, got 'yyyy") {
		t.Errorf("submit job --wait: exit %d, stdout %q, stderr %.200q", code, out, errOut)
	}
	m, d := dead.wait("huge-1", 10*time.Second)
	if d.Error.Code != 400 || d.Job.Deliveries != 1 || !d.Job.PayloadTruncated || d.Job.PayloadSize != len(body) ||
		d.Job.Seq == 0 || !strings.HasPrefix(body, string(d.Job.PayloadBytes)) {
		t.Errorf("dead letter: code %d, deliveries %d, truncated %v, size %d of %d, seq %d",
			d.Error.Code, d.Job.Deliveries, d.Job.PayloadTruncated, d.Job.PayloadSize, len(body), d.Job.Seq)
	}
	t.Logf("dead letter of %d bytes holds %d of the payload's %d bytes and %d of the error's", len(m.Data), len(d.Job.PayloadBytes), len(body), len(d.Error.Message))
	jobsGone(t, js)
	time.Sleep(500 * time.Millisecond)
	if c := dead.count("huge-1"); c != 1 {
		t.Errorf("dead-lettered %d times", c)
	}
	assertStillServing(t, n, nc, 2)
}

// TestHostileJobReplyToForgery: a Pyfleet-Reply-To into the JetStream API or
// the pool's own results is a 400 dead-lettered at once, and nothing lands
// there; a stored result that names another job is not taken for the job's.
func TestHostileJobReplyToForgery(t *testing.T) {
	n := startNode(t, nodeOptions{workers: 2})
	nc := n.connect()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	dead := watchDead(t, nc)
	for _, c := range []struct{ id, to, naming string }{
		{"rt-js", "$JS.API.STREAM.PURGE.PYFLEET_JOBS", "inside $JS.>"},
		{"rt-result", "pyfleet.result.default.victim", "inside pyfleet.result.>"},
		{"rt-wild", "pyfleet.req.default.*", "wildcard"},
	} {
		out, errOut, code := runSubmit(t, n.url, "", "job", "--wait", "--timeout", "30s", "--id", c.id, "--reply-to", c.to, "echo", `{"forged":true}`)
		if code != 1 || !strings.Contains(errOut, "400 BadRequest: header Pyfleet-Reply-To") || !strings.Contains(errOut, c.naming) {
			t.Errorf("Reply-To %s: exit %d, stdout %q, stderr %q", c.to, code, out, errOut)
		}
		if _, d := dead.wait(c.id, 10*time.Second); d.Job.Deliveries != 1 {
			t.Errorf("%s dead-lettered after %d deliveries", c.id, d.Job.Deliveries)
		}
	}
	s, err := js.Stream(context.Background(), "PYFLEET_RESULTS")
	if err != nil {
		t.Fatal(err)
	}
	if m, err := s.GetLastMsgForSubject(context.Background(), "pyfleet.result.default.victim"); !errors.Is(err, jetstream.ErrMsgNotFound) {
		t.Errorf("a result was stored for the victim: %v %v", m, err)
	}

	// A result planted for a job id before the job comes: it names
	// another job, so the job runs and its own result replaces it.
	plant := nats.NewMsg("pyfleet.result.default.planted-1")
	plant.Header.Set(protocol.HeaderStatus, protocol.StatusOK)
	plant.Header.Set(protocol.HeaderJobID, "someone-else")
	plant.Header.Set(protocol.HeaderFunction, "echo")
	plant.Data = []byte(`"planted"`)
	if _, err := js.PublishMsg(context.Background(), plant); err != nil {
		t.Fatal(err)
	}
	job := nats.NewMsg("pyfleet.job.default.echo")
	job.Header.Set(protocol.HeaderMsgID, "planted-1")
	job.Data = []byte(`{"real":1}`)
	if _, err := js.PublishMsg(context.Background(), job); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 30*time.Second, "the job's own result stored", func() bool {
		m, err := s.GetLastMsgForSubject(context.Background(), "pyfleet.result.default.planted-1")
		return err == nil && m.Header.Get(protocol.HeaderNode) == n.name
	})
	out, errOut, code := runSubmit(t, n.url, "", "job", "--wait", "--timeout", "30s", "--id", "planted-1", "echo", `{"real":1}`)
	if code != 0 || out != "{\"real\":1}\n" {
		t.Errorf("submit job --wait planted-1: exit %d, stdout %q, stderr %q; want the job's own result", code, out, errOut)
	}
	if !n.hasLog("stored result is not this job's; ignored, the job runs", map[string]string{"job": "planted-1"}) {
		t.Errorf("the planted result was not logged")
	}
	assertStillServing(t, n, nc, 2)
}

// TestHostileJobResultsStreamFull: an operator's PYFLEET_RESULTS that is
// full with discard new (created before the node, which leaves it alone)
// gets a job dead-lettered on its first delivery, with an error that says
// the results stream refused the write and why; `submit job --wait`
// returns that error from the dead letter, the only place it is stored.
func TestHostileJobResultsStreamFull(t *testing.T) {
	srv := startNATSJetStream(t, "full")
	nc := connectNATS(t, srv.url())
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{
		Name: "PYFLEET_RESULTS", Subjects: []string{"pyfleet.result.>"}, MaxMsgs: 1, Discard: jetstream.DiscardNew,
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := js.Publish(ctx, "pyfleet.result.default.filler", []byte(`"filler"`)); err != nil {
		t.Fatal(err)
	}
	n := startNode(t, onNATS(srv.url(), nodeOptions{workers: 2}))
	dead := watchDead(t, nc)
	out, errOut, code := runSubmit(t, srv.url(), "", "job", "--wait", "--timeout", "60s", "--id", "full-1", "echo", `{"a":1}`)
	want := "503 ResultRefused: the results stream PYFLEET_RESULTS refused to store the job's result: maximum messages exceeded"
	if code != 1 || !strings.Contains(errOut, want) {
		t.Errorf("submit job --wait: exit %d, stdout %q, stderr %q; want 1 and %q", code, out, errOut, want)
	}
	if _, d := dead.wait("full-1", 10*time.Second); d.Job.Deliveries != 1 || d.Error.Type != "ResultRefused" || string(d.Job.Payload) != `{"a":1}` {
		t.Errorf("dead letter %+v", d)
	}
	jobsGone(t, js)
	if strings.Contains(n.log(), "DeliveryLimit") {
		t.Errorf("the job was blamed on a dead node:\n%s", n.log())
	}
	assertStillServing(t, n, nc, 2)
}
