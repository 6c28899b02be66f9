package client_test

import (
	"context"
	"errors"
	"regexp"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/client"
	"github.com/pyfleet/pyfleet/protocol"
)

func TestSubmitAndResult(t *testing.T) {
	c := connect(t, client.Options{})
	ctx := bounded(t, 60*time.Second)

	job, err := c.Submit(ctx, "echo", map[string]int{"x": 1}, client.WithAwait())
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`^[0-9a-f]{16}$`).MatchString(job.ID) || job.Duplicate || job.Seq == 0 {
		t.Fatalf("job %+v", job)
	}
	var out map[string]int
	var h nats.Header
	if err := job.Result(ctx, &out, client.WithReplyHeader(&h)); err != nil || out["x"] != 1 {
		t.Fatalf("result %v, %v", out, err)
	}
	if h.Get(protocol.HeaderJobID) != job.ID || h.Get(protocol.HeaderNode) != mainNode.name {
		t.Errorf("result headers %v", h)
	}

	// A handle for a job submitted elsewhere finds the same stored result.
	out = nil
	if err := c.Job(job.ID).Result(ctx, &out); err != nil || out["x"] != 1 {
		t.Fatalf("Job(id).Result: %v, %v", out, err)
	}

	// A second submission of an id within the dedup window is not queued.
	dupID := uniqueJobID("client-dup")
	first, err := c.Submit(ctx, "echo", "first", client.WithJobID(dupID))
	if err != nil {
		t.Fatal(err)
	}
	again, err := c.Submit(ctx, "echo", "second", client.WithJobID(dupID))
	if err != nil {
		t.Fatal(err)
	}
	if first.Duplicate || !again.Duplicate || again.ID != dupID {
		t.Errorf("first %+v, again %+v", first, again)
	}
	var s string
	if err := again.Result(ctx, &s); err != nil || s != "first" {
		t.Errorf("duplicate's result %q, %v", s, err)
	}

	// A generator's items are stored as one array.
	job, err = c.Submit(ctx, "count", map[string]int{"n": 3})
	if err != nil {
		t.Fatal(err)
	}
	var items []int
	if err := job.Result(ctx, &items); err != nil || !slices.Equal(items, []int{0, 1, 2}) {
		t.Errorf("count job: %v, %v", items, err)
	}

	// A raw function's result, bytes as they are.
	job, err = c.Submit(ctx, "reverse", []byte("xyz"))
	if err != nil {
		t.Fatal(err)
	}
	var rev []byte
	if err := job.Result(ctx, &rev); err != nil || string(rev) != "zyx" {
		t.Errorf("reverse job: %q, %v", rev, err)
	}
}

func TestJobErrors(t *testing.T) {
	c := connect(t, client.Options{})
	ctx := bounded(t, 60*time.Second)

	// A job that can never succeed is dead-lettered at once, its error
	// stored as its result.
	job, err := c.Submit(ctx, "bad", nil, client.WithAwait())
	if err != nil {
		t.Fatal(err)
	}
	err = job.Result(ctx, nil)
	var ce *client.Error
	if !errors.Is(err, client.ErrBadRequest) || !errors.As(err, &ce) || ce.Local || ce.Message != "bad input" {
		t.Fatalf("bad job: %#v", err)
	}
	job, err = c.Submit(ctx, "nosuch", nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := job.Result(ctx, nil); !errors.Is(err, client.ErrNotFound) {
		t.Fatalf("job of no function: %v", err)
	}

	// No result by the deadline.
	wctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	err = c.Job("never-submitted").Result(wctx, nil)
	if !errors.Is(err, client.ErrDeadlineExceeded) || !errors.Is(err, context.DeadlineExceeded) || !errors.As(err, &ce) || !ce.Local {
		t.Fatalf("waiting for no job: %#v", err)
	}
	cctx, cancel := context.WithCancel(ctx)
	time.AfterFunc(100*time.Millisecond, cancel)
	if err := c.Job("never-submitted").Result(cctx, nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled wait: %v", err)
	}

	// Under a prefix no node serves there are no streams.
	other := connect(t, client.Options{Prefix: "elsewhere"})
	_, err = other.Submit(ctx, "echo", nil)
	if !errors.Is(err, client.ErrUnavailable) || !errors.As(err, &ce) || ce.Type != client.TypeNoStream ||
		ce.Message != "no ELSEWHERE_JOBS stream: is a poolnode running?" {
		t.Fatalf("submit under another prefix: %#v", err)
	}
	_, err = other.Submit(ctx, "echo", nil, client.WithAwait())
	if !errors.As(err, &ce) || ce.Message != "no ELSEWHERE_RESULTS stream: is a poolnode running?" {
		t.Fatalf("awaited submit under another prefix: %#v", err)
	}
}

func TestNodes(t *testing.T) {
	c := connect(t, client.Options{})
	nodes, err := c.Nodes(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(nodes, func(n client.NodeInfo) bool { return n.Node == mainNode.name })
	if i < 0 {
		t.Fatalf("the main node is not listed: %+v", nodes)
	}
	n := nodes[i]
	if n.Pool != "default" || n.ID == "" || n.Workers == nil || *n.Workers != 2 || n.Busy == nil || n.Handled == nil || n.Started.IsZero() {
		t.Errorf("main node: %+v", n)
	}
	// A fleet under another prefix is not this one.
	other := connect(t, client.Options{Prefix: "elsewhere"})
	if nodes, err := other.Nodes(t.Context()); err != nil || len(nodes) != 0 {
		t.Errorf("nodes under another prefix: %+v, %v", nodes, err)
	}
}

func TestEvents(t *testing.T) {
	c := connect(t, client.Options{})
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	type seen struct {
		ev  *client.EventMsg
		err error
	}
	got := make(chan seen, 16)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ev, err := range c.Events(ctx, client.EventFilter{Pool: "default", Node: mainNode.name}) {
			select {
			case got <- seen{ev, err}:
			case <-ctx.Done():
				return
			}
		}
	}()
	defer func() {
		cancel()
		<-done
	}()
	// A message that is not an event is said and skipped. It is sent
	// until it is seen: other subscribers (the node's own) make the
	// server's interest in the subject no sign that this one is there.
	nc, err := nats.Connect(natsURL)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	var bad *client.EventError
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for sawBad := false; !sawBad; {
		if err := nc.Publish("pyfleet.evt.default."+mainNode.name+".ready", []byte("not json")); err != nil {
			t.Fatal(err)
		}
		select {
		case s := <-got:
			switch {
			case errors.As(s.err, &bad):
				sawBad = string(bad.Data) == "not json"
			case s.err != nil:
				t.Fatal(s.err)
			}
		case <-tick.C:
		case <-ctx.Done():
			t.Fatal("the message that was not an event was not yielded as an *EventError")
		}
	}
	if err := c.Call(ctx, "crash", nil, nil); !errors.Is(err, client.ErrWorkerLost) {
		t.Fatalf("crash: %v", err)
	}
	for {
		select {
		case s := <-got:
			switch {
			case errors.As(s.err, &bad):
				// One of the repeats sent before the first was seen.
			case s.err != nil:
				t.Fatal(s.err)
			case s.ev.Kind == client.KindCrashed:
				if s.ev.Node != mainNode.name || s.ev.Pool != "default" || s.ev.ExitCode == nil || *s.ev.ExitCode != 3 ||
					s.ev.Worker == "" || s.ev.PID == 0 || s.ev.Subject != "pyfleet.evt.default."+mainNode.name+".crashed" {
					t.Errorf("crashed event %+v", s.ev)
				}
				return
			}
		case <-ctx.Done():
			t.Fatal("no crashed event")
		}
	}
}
