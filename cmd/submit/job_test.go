package main

import (
	"context"
	"encoding/json"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pyfleet/pyfleet/protocol"
)

// mustStreams creates the job and result streams the way a node would.
func mustStreams(t *testing.T, nc *nats.Conn) jetstream.JetStream {
	t.Helper()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx := withTimeout(t, 10*time.Second)
	for _, cfg := range []jetstream.StreamConfig{
		{Name: "PYFLEET_JOBS", Subjects: []string{"pyfleet.job.>"}, Retention: jetstream.WorkQueuePolicy},
		{Name: "PYFLEET_RESULTS", Subjects: []string{"pyfleet.result.>"}},
	} {
		if _, err := js.CreateStream(ctx, cfg); err != nil {
			t.Fatal(err)
		}
	}
	return js
}

// fakeJobWorker runs jobs like a node: echo answers its payload, anything
// else fails; the result is stored on pyfleet.result.<pool>.<id>, then the
// job is acked.
func fakeJobWorker(t *testing.T, js jetstream.JetStream) {
	t.Helper()
	ctx := withTimeout(t, 10*time.Second)
	cons, err := js.CreateOrUpdateConsumer(ctx, "PYFLEET_JOBS", jetstream.ConsumerConfig{
		Durable: "workers", AckPolicy: jetstream.AckExplicitPolicy,
	})
	if err != nil {
		t.Fatal(err)
	}
	cc, err := cons.Consume(func(m jetstream.Msg) {
		tok := strings.Split(m.Subject(), ".") // pyfleet.job.<pool>.<function>
		res := &nats.Msg{Subject: "pyfleet.result." + tok[2] + "." + m.Headers().Get(jetstream.MsgIDHeader)}
		if tok[3] == "echo" {
			res.Header, res.Data = okHeader("node-a"), m.Data()
		} else {
			res.Header, res.Data = errorReply(500, "RuntimeError", "this function always fails")
		}
		// Not t.Context(): the client may see the stored result and end the
		// test before this publish has its acknowledgement. A failure shows
		// as a missing result.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if _, err := js.PublishMsg(ctx, res); err == nil {
			_ = m.Ack()
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cc.Stop()
		<-cc.Closed()
	})
}

func storeResult(t *testing.T, js jetstream.JetStream, id string, h nats.Header, data string) {
	t.Helper()
	if _, err := js.PublishMsg(t.Context(), &nats.Msg{Subject: "pyfleet.result.default." + id, Header: h, Data: []byte(data)}); err != nil {
		t.Fatal(err)
	}
}

func TestJobPublishes(t *testing.T) {
	s := mustServer(t)
	js := mustStreams(t, mustConn(t, s))

	r := submit(t, s, "", "job", "echo", `{"a":1}`)
	if r.code != 0 || !regexp.MustCompile(`^[0-9a-f]{16}\n$`).MatchString(r.stdout) {
		t.Fatalf("got exit %d, stdout %q, stderr %q; want a 16 hex digit id", r.code, r.stdout, r.stderr)
	}
	id := strings.TrimSpace(r.stdout)
	stream, err := js.Stream(t.Context(), "PYFLEET_JOBS")
	if err != nil {
		t.Fatal(err)
	}
	m, err := stream.GetLastMsgForSubject(t.Context(), "pyfleet.job.default.echo")
	if err != nil {
		t.Fatal(err)
	}
	if got := m.Header.Get(jetstream.MsgIDHeader); got != id || string(m.Data) != `{"a":1}` {
		t.Fatalf("stored job has id %q, body %q; want %q, {\"a\":1}", got, m.Data, id)
	}

	if got := m.Header.Get(protocol.HeaderTimeout); got != "" {
		t.Fatalf("a job without --job-timeout carries %s %q: the node's --job-timeout should apply", protocol.HeaderTimeout, got)
	}

	// --job-timeout is the job's deadline; --timeout only how long --wait waits.
	r = submit(t, s, "", "job", "--id", "long-1", "--job-timeout", "10m", "--timeout", "1s", "echo")
	r.want(t, 0, "long-1\n")
	if m, err = stream.GetLastMsgForSubject(t.Context(), "pyfleet.job.default.echo"); err != nil {
		t.Fatal(err)
	}
	if got := m.Header.Get(protocol.HeaderTimeout); got != "600000" {
		t.Fatalf("--job-timeout 10m sent %s %q, want 600000", protocol.HeaderTimeout, got)
	}

	r = submit(t, s, "", "job", "--id", "fixed-1", "echo")
	r.want(t, 0, "fixed-1\n")
	r = submit(t, s, "", "job", "--id", "fixed-1", "echo")
	r.want(t, 0, "fixed-1\n")
	if !strings.Contains(r.stderr, "already submitted") {
		t.Fatalf("a duplicate id is not reported: %q", r.stderr)
	}
}

func TestJobWait(t *testing.T) {
	s := mustServer(t)
	js := mustStreams(t, mustConn(t, s))
	fakeJobWorker(t, js)

	submit(t, s, "", "job", "--wait", "--timeout", "10s", "echo", `{"a":1}`).want(t, 0, "{\"a\":1}\n")
	r := submit(t, s, "", "job", "--wait", "--id", "f1", "--timeout", "10s", "fail")
	r.want(t, 1, "")
	if r.stderr != "500 RuntimeError: this function always fails\n" {
		t.Fatalf("stderr %q", r.stderr)
	}
}

// A result stored before submit looks (a resubmitted id, or a fast node) is
// still found, chunks of a streamed result included.
func TestJobWaitFindsStoredResult(t *testing.T) {
	s := mustServer(t)
	js := mustStreams(t, mustConn(t, s))

	storeResult(t, js, "done-1", okHeader("node-a"), `"stored"`)
	submit(t, s, "", "job", "--wait", "--id", "done-1", "--timeout", "10s", "echo").want(t, 0, "\"stored\"\n")

	chunk := okHeader("node-a")
	chunk.Set(protocol.HeaderStream, "chunk")
	end := okHeader("node-a")
	end.Set(protocol.HeaderStream, "end")
	storeResult(t, js, "stream-1", chunk, "0")
	storeResult(t, js, "stream-1", chunk, "1")
	storeResult(t, js, "stream-1", end, "")
	submit(t, s, "", "job", "--wait", "--id", "stream-1", "--timeout", "10s", "count").want(t, 0, "0\n1\n")
}

func TestJobErrors(t *testing.T) {
	s := mustServer(t)

	r := submit(t, s, "", "job", "echo")
	r.want(t, 3, "")
	if !strings.Contains(r.stderr, "no PYFLEET_JOBS stream: is a poolnode running?") {
		t.Fatalf("stderr %q", r.stderr)
	}
	r = submit(t, s, "", "job", "--wait", "echo")
	r.want(t, 3, "")
	if !strings.Contains(r.stderr, "no PYFLEET_RESULTS stream: is a poolnode running?") {
		t.Fatalf("stderr %q", r.stderr)
	}

	mustStreams(t, mustConn(t, s))
	r = submit(t, s, "", "job", "--wait", "--id", "never", "--timeout", "300ms", "echo")
	r.want(t, 3, "")
	if !strings.Contains(r.stderr, "no result for job never within 300ms") {
		t.Fatalf("stderr %q", r.stderr)
	}
}

// TestJobWithoutJetStream: against a server that has no JetStream (nats-server's
// default), `submit job` says so at once rather than blaming a missing stream
// or hanging, with and without --wait.
func TestJobWithoutJetStream(t *testing.T) {
	s, err := server.NewServer(&server.Options{ServerName: "plain", Host: "127.0.0.1", Port: -1, NoLog: true, NoSigs: true})
	if err != nil {
		t.Fatal(err)
	}
	s.Start()
	t.Cleanup(func() {
		s.Shutdown()
		s.WaitForShutdown()
	})
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats server not ready")
	}
	for _, args := range [][]string{{"job", "echo"}, {"job", "--wait", "echo"}, {"job", "--wait", "--timeout", "1h", "echo"}} {
		start := time.Now()
		r := submit(t, s, "", append(args, `{}`)...)
		r.want(t, 3, "")
		if !strings.Contains(r.stderr, `the NATS server "plain"`) || !strings.Contains(r.stderr, "has no JetStream, so jobs are unavailable") {
			t.Errorf("submit %v: stderr %q, want it to say the server has no JetStream", args, r.stderr)
		}
		if took := time.Since(start); took > 10*time.Second {
			t.Errorf("submit %v took %s", args, took)
		}
	}
}

// TestJobWaitEndsOnDeadLetter: when the node can dead-letter a job but not
// store its error as the result (a full results stream), --wait ends with
// the dead letter's error. Dead letters of other jobs, and one of the same
// id from before this submission, are not taken for it.
func TestJobWaitEndsOnDeadLetter(t *testing.T) {
	s := mustServer(t)
	nc := mustConn(t, s)
	js := mustStreams(t, nc)
	ctx := withTimeout(t, 10*time.Second)
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "PYFLEET_DEAD", Subjects: []string{"pyfleet.dead.>"}}); err != nil {
		t.Fatal(err)
	}
	deadLetter := func(id, msg string) {
		h, body := errorReply(503, "ResultRefused", msg)
		h.Set(protocol.HeaderJobID, id)
		var d map[string]any
		_ = json.Unmarshal(body, &d)
		d["job"] = map[string]any{"id": id, "subject": "pyfleet.job.default.echo", "seq": 1, "deliveries": 1}
		body, _ = json.Marshal(d)
		if _, err := js.PublishMsg(ctx, &nats.Msg{Subject: "pyfleet.dead.default.echo", Header: h, Data: body}); err != nil {
			t.Fatal(err)
		}
	}
	deadLetter("d1", "an earlier submission of d1")
	// A node that dead-letters every job, another job's first.
	cons, err := js.CreateOrUpdateConsumer(ctx, "PYFLEET_JOBS", jetstream.ConsumerConfig{Durable: "n", AckPolicy: jetstream.AckExplicitPolicy})
	if err != nil {
		t.Fatal(err)
	}
	cc, err := cons.Consume(func(m jetstream.Msg) {
		deadLetter("someone-else", "not this job")
		deadLetter(m.Headers().Get(jetstream.MsgIDHeader), "the results stream PYFLEET_RESULTS refused to store the job's result")
		_ = m.Term()
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cc.Stop()
		<-cc.Closed()
	})
	r := submit(t, s, "", "job", "--wait", "--id", "d1", "--timeout", "10s", "echo", `{}`)
	r.want(t, 1, "")
	if r.stderr != "503 ResultRefused: the results stream PYFLEET_RESULTS refused to store the job's result\n" {
		t.Fatalf("stderr %q", r.stderr)
	}
}
