package client_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/client"
	"github.com/pyfleet/pyfleet/protocol"
)

func connect(t *testing.T, o client.Options) *client.Client {
	t.Helper()
	c, err := client.Connect(natsURL, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// bounded is a context for one test step that could otherwise hang.
func bounded(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}

func TestCall(t *testing.T) {
	c := connect(t, client.Options{})
	ctx := bounded(t, 30*time.Second)

	var out map[string]int
	var h nats.Header
	if err := c.Call(ctx, "echo", map[string]int{"hi": 1}, &out, client.WithReplyHeader(&h), client.WithRequestID("r-1")); err != nil {
		t.Fatal(err)
	}
	if out["hi"] != 1 || len(out) != 1 {
		t.Errorf("echo returned %v", out)
	}
	if got := h.Get(protocol.HeaderNode); got != mainNode.name {
		t.Errorf("Pyfleet-Node %q, want %q", got, mainNode.name)
	}
	if h.Get(protocol.HeaderWorker) == "" || h.Get(protocol.HeaderRequestID) != "r-1" {
		t.Errorf("reply headers %v lack the worker or the request id", h)
	}

	// Bytes as they are, both ways: a raw function.
	var rev []byte
	if err := c.Call(ctx, "reverse", []byte("abc\x00\xff"), &rev); err != nil {
		t.Fatal(err)
	}
	if string(rev) != "\xff\x00cba" {
		t.Errorf("reverse returned %q", rev)
	}

	// JSON the caller made, and the JSON as the node sent it.
	var raw json.RawMessage
	if err := c.Call(ctx, "echo", json.RawMessage(`[1, "two"]`), &raw); err != nil {
		t.Fatal(err)
	}
	var back []any
	if err := json.Unmarshal(raw, &back); err != nil || len(back) != 2 || back[1] != "two" {
		t.Errorf("echo of raw JSON returned %s (%v)", raw, err)
	}

	// nil is JSON null; a nil result drops the answer.
	var null any = "not null"
	if err := c.Call(ctx, "echo", nil, &null); err != nil || null != nil {
		t.Errorf("echo of nil: %v, %v", null, err)
	}
	if err := c.Call(ctx, "echo", 1, nil); err != nil {
		t.Error(err)
	}

	// A generator called with Call: its items as one array.
	var items []int
	if err := c.Call(ctx, "count", map[string]int{"n": 4}, &items); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(items, []int{0, 1, 2, 3}) {
		t.Errorf("count returned %v", items)
	}

	// A result that does not decode into result says so.
	var wrong []string
	if err := c.Call(ctx, "echo", 5, &wrong); err == nil || !strings.Contains(err.Error(), "decoding the result") {
		t.Errorf("decoding 5 into []string: %v", err)
	}
}

func TestStream(t *testing.T) {
	c := connect(t, client.Options{})
	ctx := bounded(t, 30*time.Second)

	var got []int
	for item, err := range c.Stream(ctx, "count", map[string]int{"n": 5}) {
		if err != nil {
			t.Fatal(err)
		}
		var i int
		if err := item.Decode(&i); err != nil {
			t.Fatal(err)
		}
		if !item.Chunk() || item.Node() != mainNode.name || item.Worker() == "" {
			t.Errorf("item %d: chunk %v, node %q, worker %q", i, item.Chunk(), item.Node(), item.Worker())
		}
		got = append(got, i)
	}
	if !slices.Equal(got, []int{0, 1, 2, 3, 4}) {
		t.Errorf("streamed %v", got)
	}

	// Breaking out abandons the call; the client goes on.
	n := 0
	for _, err := range c.Stream(ctx, "count", map[string]int{"n": 1000}) {
		if err != nil {
			t.Fatal(err)
		}
		if n++; n == 3 {
			break
		}
	}
	// A generator that raises: its items, then its error.
	got = got[:0]
	var end error
	for item, err := range c.Stream(ctx, "countfail", nil) {
		if err != nil {
			end = err
			continue
		}
		var i int
		_ = item.Decode(&i)
		got = append(got, i)
	}
	var ce *client.Error
	if !slices.Equal(got, []int{0, 1}) || !errors.As(end, &ce) || ce.Code != 500 || ce.Type != "ValueError" || ce.Message != "boom" {
		t.Errorf("countfail: items %v, error %v", got, end)
	}

	// Any other function streams its one result.
	var items []string
	for item, err := range c.Stream(ctx, "echo", "one") {
		if err != nil {
			t.Fatal(err)
		}
		var s string
		_ = item.Decode(&s)
		items = append(items, s)
		if item.Chunk() {
			t.Error("a whole result called a chunk")
		}
	}
	if !slices.Equal(items, []string{"one"}) {
		t.Errorf("echo as a stream: %v", items)
	}
}

func TestSession(t *testing.T) {
	c := connect(t, client.Options{})
	ctx := bounded(t, 60*time.Second)
	s := c.Session("")
	if !regexp.MustCompile(`^[0-9a-f]{16}$`).MatchString(s.Key()) || s.Node() != "" {
		t.Fatalf("new session: key %q, node %q", s.Key(), s.Node())
	}
	// Concurrent from the start: the calls that come before the first
	// answer wait for it, so all land on one worker.
	pids := make(chan int, 40)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 5 {
				var who struct{ PID int }
				if err := s.Call(ctx, "whoami", nil, &who); err != nil {
					t.Error(err)
					return
				}
				pids <- who.PID
			}
		})
	}
	wg.Wait()
	close(pids)
	seen := map[int]int{}
	for p := range pids {
		seen[p]++
	}
	if len(seen) != 1 {
		t.Errorf("one session reached workers %v", seen)
	}
	if s.Node() != mainNode.name {
		t.Errorf("session on node %q, want %q", s.Node(), mainNode.name)
	}
	// A stream in the session runs on the same worker too.
	for item, err := range s.Stream(ctx, "whoami", nil) {
		if err != nil {
			t.Fatal(err)
		}
		var who struct{ PID int }
		_ = item.Decode(&who)
		if seen[who.PID] == 0 {
			t.Errorf("stream in the session ran in pid %d, not %v", who.PID, seen)
		}
	}
	// Another session is another key.
	if c.Session("").Key() == s.Key() {
		t.Error("two sessions got the same key")
	}
}

// TestErrors gets every error sentinel from a real node, or from NATS for
// the client's own conclusions.
func TestErrors(t *testing.T) {
	c := connect(t, client.Options{})
	nobody := connect(t, client.Options{Pool: "nobody"})
	sentinels := []error{client.ErrBadRequest, client.ErrNotFound, client.ErrDeadlineExceeded, client.ErrSessionLost,
		client.ErrPayloadTooLarge, client.ErrWorkerLost, client.ErrUnavailable}
	for _, tc := range []struct {
		name     string
		c        *client.Client
		function string
		arg      any
		opts     []client.Option
		want     error // nil: no sentinel matches
		code     int
		typ      string
		local    bool
	}{
		{"raised BadRequest", c, "bad", nil, nil, client.ErrBadRequest, 400, "BadRequest", false},
		{"body not JSON", c, "echo", []byte("{nope"), nil, client.ErrBadRequest, 400, "BadRequest", false},
		{"no such function", c, "nosuch", nil, nil, client.ErrNotFound, 404, "NotFound", false},
		{"node's deadline", c, "wait", map[string]int{"ms": 10000}, []client.Option{client.WithTimeout(300 * time.Millisecond)},
			client.ErrDeadlineExceeded, 408, "DeadlineExceeded", false},
		{"reply too large", c, "big", map[string]int{"bytes": 2 << 20}, nil, client.ErrPayloadTooLarge, 413, "TooLarge", false},
		{"argument too large", c, "echo", []byte(`"` + strings.Repeat("x", 2<<20) + `"`), nil, client.ErrPayloadTooLarge, 413, "TooLarge", true},
		{"worker died", c, "crash", nil, nil, client.ErrWorkerLost, 500, "WorkerLost", false},
		{"function raised", c, "fail", nil, nil, nil, 500, "RuntimeError", false},
		{"no node of the pool", nobody, "echo", nil, nil, client.ErrUnavailable, 503, client.TypeNoResponders, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.c.Call(bounded(t, 30*time.Second), tc.function, tc.arg, nil, tc.opts...)
			var ce *client.Error
			if !errors.As(err, &ce) {
				t.Fatalf("got %v (%T), want a *client.Error", err, err)
			}
			if ce.Code != tc.code || ce.Type != tc.typ || ce.Local != tc.local || ce.Message == "" {
				t.Errorf("got %+v, want code %d type %s local %v", ce, tc.code, tc.typ, tc.local)
			}
			if !tc.local && ce.Node != mainNode.name {
				t.Errorf("error from node %q, want %q", ce.Node, mainNode.name)
			}
			for _, s := range sentinels {
				if got := errors.Is(err, s); got != (s == tc.want) {
					t.Errorf("errors.Is(%v, %v) = %v", err, s, got)
				}
			}
		})
	}

	t.Run("session lost", func(t *testing.T) {
		ctx := bounded(t, 30*time.Second)
		s := c.Session("")
		if err := s.Call(ctx, "whoami", nil, nil); err != nil {
			t.Fatal(err)
		}
		if err := s.Call(ctx, "crash", nil, nil); !errors.Is(err, client.ErrWorkerLost) {
			t.Fatalf("crash in the session: %v", err)
		}
		err := s.Call(ctx, "whoami", nil, nil)
		var ce *client.Error
		if !errors.Is(err, client.ErrSessionLost) || !errors.As(err, &ce) || ce.Code != 410 || ce.Local || ce.Node != mainNode.name {
			t.Fatalf("call after the session's worker died: %#v", err)
		}
	})

	t.Run("context deadline", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
		defer cancel()
		err := c.Call(ctx, "wait", map[string]int{"ms": 10000}, nil)
		// The node's 408 or the client's own, whichever comes first.
		if !errors.Is(err, client.ErrDeadlineExceeded) {
			t.Fatalf("got %v", err)
		}
		var ce *client.Error
		if errors.As(err, &ce) && ce.Local && !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("a local deadline error does not match context.DeadlineExceeded: %v", err)
		}
	})

	t.Run("silent responder", func(t *testing.T) {
		// Something takes the calls of pool "silent" and never answers, as
		// a node that died the moment it got a call would.
		nc, err := nats.Connect(natsURL)
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		if _, err := nc.Subscribe("pyfleet.req.silent.*", func(*nats.Msg) {}); err != nil {
			t.Fatal(err)
		}
		if err := nc.Flush(); err != nil {
			t.Fatal(err)
		}
		// Without heartbeats the client gives up a margin past the deadline.
		quiet := connect(t, client.Options{Pool: "silent", Heartbeat: -1})
		err = quiet.Call(t.Context(), "echo", nil, nil, client.WithTimeout(100*time.Millisecond))
		var ce *client.Error
		if !errors.As(err, &ce) || !ce.Local || !errors.Is(err, client.ErrDeadlineExceeded) || !errors.Is(err, context.DeadlineExceeded) ||
			ce.Message != "no answer from pyfleet.req.silent.echo within 100ms" {
			t.Fatalf("without heartbeats: %#v", err)
		}
		// With them, a call no node said it holds fails after three
		// missed heartbeats, whatever its deadline.
		beating := connect(t, client.Options{Pool: "silent"})
		err = beating.Call(t.Context(), "echo", nil, nil, client.WithTimeout(time.Hour))
		if !errors.As(err, &ce) || !ce.Local || !errors.Is(err, client.ErrUnavailable) || ce.Type != client.TypeNodeLost ||
			!strings.Contains(ce.Message, "no node took the call on pyfleet.req.silent.echo within 3s") {
			t.Fatalf("with heartbeats: %#v", err)
		}
	})

	t.Run("cancelled", func(t *testing.T) {
		ctx, cancel := context.WithCancel(t.Context())
		time.AfterFunc(200*time.Millisecond, cancel)
		if err := c.Call(ctx, "wait", map[string]int{"ms": 10000}, nil); !errors.Is(err, context.Canceled) {
			t.Fatalf("got %v, want context.Canceled", err)
		}
	})

	t.Run("bad names", func(t *testing.T) {
		for _, err := range []error{
			c.Call(t.Context(), "a.b", nil, nil),
			c.Call(t.Context(), "echo", nil, nil, client.WithNode("n*")),
		} {
			if !errors.Is(err, client.ErrBadRequest) || !strings.Contains(err.Error(), "subject token") && !strings.Contains(err.Error(), "must not contain") {
				t.Errorf("got %v", err)
			}
		}
		if _, err := client.New(c.Conn(), client.Options{Pool: "a.b"}); err == nil {
			t.Error("a pool with a dot accepted")
		}
		if _, err := client.New(c.Conn(), client.Options{Heartbeat: time.Millisecond}); err == nil {
			t.Error("a heartbeat the node refuses accepted")
		}
	})
}

// TestOverloadedIsUnavailable: a node's own 503 (a session over
// --max-sessions) is ErrUnavailable, not a local conclusion.
func TestOverloadedIsUnavailable(t *testing.T) {
	n := startNode(t, "tight", "--max-sessions", "1")
	c := connect(t, client.Options{Pool: "tight"})
	ctx := bounded(t, 30*time.Second)
	if err := c.Session("").Call(ctx, "echo", 1, nil); err != nil {
		t.Fatal(err)
	}
	err := c.Session("").Call(ctx, "echo", 2, nil)
	var ce *client.Error
	if !errors.Is(err, client.ErrUnavailable) || !errors.As(err, &ce) || ce.Local || ce.Type != call.TypeOverloaded || ce.Node != n.name {
		t.Fatalf("second session: %#v", err)
	}
}

// TestNodeKilledUnderCall: a node killed with SIGKILL while it runs a call
// answers nothing, and core NATS tells the caller nothing; the heartbeats
// stop, and the call fails then, long before its deadline.
func TestNodeKilledUnderCall(t *testing.T) {
	n := startNode(t, "victim")
	c := connect(t, client.Options{Pool: "victim"})
	const deadline = 2 * time.Minute
	failed := make(chan error, 1)
	go func() {
		failed <- c.Call(t.Context(), "block", map[string]int{"ms": 60000}, nil, client.WithTimeout(deadline))
	}()
	ctx := bounded(t, 60*time.Second)
	for busy := false; !busy; {
		nodes, err := c.Nodes(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, info := range nodes {
			busy = busy || info.Node == n.name && info.Busy != nil && *info.Busy == 1
		}
		select {
		case err := <-failed:
			t.Fatalf("the call ended before the kill: %v", err)
		default:
		}
		if ctx.Err() != nil {
			t.Fatalf("the call never started: nodes %+v", nodes)
		}
	}
	if err := n.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	var err error
	select {
	case err = <-failed:
	case <-time.After(deadline / 2):
		t.Fatalf("the call was still waiting %v after its node was killed", deadline/2)
	}
	t.Logf("failed %v after the kill: %v", time.Since(killed).Round(time.Millisecond), err)
	var ce *client.Error
	if !errors.Is(err, client.ErrWorkerLost) || !errors.As(err, &ce) || !ce.Local || ce.Node != n.name ||
		!strings.Contains(ce.Message, "node "+n.name+" stopped answering while it held the call") {
		t.Fatalf("got %#v", err)
	}
	<-n.done
}

// TestManyCallsOneClient: one client, one connection, many goroutines: every
// answer reaches its own caller.
func TestManyCallsOneClient(t *testing.T) {
	c := connect(t, client.Options{})
	ctx := bounded(t, 120*time.Second)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 50 {
				want := fmt.Sprintf("%d-%d", g, i)
				var got string
				if err := c.Call(ctx, "echo", want, &got); err != nil || got != want {
					t.Errorf("call %s: %q, %v", want, got, err)
					return
				}
			}
		})
	}
	wg.Wait()
}

func TestClosedClient(t *testing.T) {
	c, err := client.Connect(natsURL, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	failed := make(chan error, 1)
	go func() { failed <- c.Call(t.Context(), "wait", map[string]int{"ms": 20000}, nil) }()
	// Wait until the call is in flight, then close under it.
	waitFor(t, "the call to be sent", func() bool { return srv.NumSubscriptions() > 0 && inFlight(t) })
	c.Close()
	select {
	case err := <-failed:
		if !errors.Is(err, nats.ErrConnectionClosed) {
			t.Fatalf("got %v, want nats.ErrConnectionClosed", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("a call outlived its client by 15 s")
	}
	if err := c.Call(t.Context(), "echo", 1, nil); err == nil {
		t.Fatal("a closed client made a call")
	}
}

// inFlight reports whether the main node runs a call.
func inFlight(t *testing.T) bool {
	c := connect(t, client.Options{})
	nodes, err := c.Nodes(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		if n.Node == mainNode.name && n.Busy != nil && *n.Busy > 0 {
			return true
		}
	}
	return false
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
