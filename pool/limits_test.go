package pool

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/pyfleet/pyfleet/call"
)

func sessionCall(p *Pool, session, payload string) (call.Result, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return p.Call(ctx, &call.Request{Function: "echo", Payload: []byte(payload), Session: session}, nil)
}

func sessionCount(p *Pool) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.sessions)
}

func wantOverloaded(t *testing.T, what string, err error, naming string) {
	t.Helper()
	var ce *call.Error
	if !errors.As(err, &ce) || ce.Code != call.CodeUnavailable || ce.Type != "Overloaded" || !strings.Contains(ce.Message, naming) {
		t.Errorf("%s: %v, want 503 Overloaded naming %q", what, err, naming)
	}
}

// A call refused at admission (queue full, in calls or in bytes) starts no
// session.
func TestRefusedCallStartsNoSession(t *testing.T) {
	p, _ := startPool(t, func(c *Config) { c.QueueLimitBytes = 100 })
	_, err := sessionCall(p, "too-big", `"`+strings.Repeat("x", 200)+`"`)
	wantOverloaded(t, "a session call over the bytes limit", err, "100 bytes")
	if n := sessionCount(p); n != 0 {
		t.Errorf("%d sessions after a refused call", n)
	}

	q, _ := startPool(t, func(c *Config) { c.QueueLimit = 1 })
	running := make(chan error, 1)
	go func() {
		_, err := callFn(q, 20*time.Second, "sleep", "1000")
		running <- err
	}()
	waitUntil(t, func() bool { return q.Stats().Busy == 1 })
	queued := make(chan error, 1)
	go func() {
		_, err := callFn(q, 20*time.Second, "echo", "1")
		queued <- err
	}()
	waitUntil(t, func() bool { return q.Stats().Queued == 1 })
	_, err = sessionCall(q, "no-room", "1")
	wantOverloaded(t, "a session call over the queue limit", err, "queue limit")
	if n := sessionCount(q); n != 0 {
		t.Errorf("%d sessions after a refused call", n)
	}
	for _, ch := range []chan error{running, queued} {
		if err := <-ch; err != nil {
			t.Error(err)
		}
	}
}

// At MaxSessions a new session gets 503 naming the limit; the sessions
// kept go on working.
func TestMaxSessions(t *testing.T) {
	p, _ := startPool(t, func(c *Config) { c.MaxSessions = 3 })
	for _, s := range []string{"a", "b", "c"} {
		if _, err := sessionCall(p, s, "1"); err != nil {
			t.Fatalf("session %s: %v", s, err)
		}
	}
	_, err := sessionCall(p, "d", "1")
	wantOverloaded(t, "a fourth session with MaxSessions 3", err, "3 sessions")
	for _, s := range []string{"a", "b", "c"} {
		if _, err := sessionCall(p, s, "2"); err != nil {
			t.Errorf("session %s after the limit: %v", s, err)
		}
	}
	if _, err := callFn(p, 5*time.Second, "echo", "1"); err != nil {
		t.Errorf("a call without a session at the limit: %v", err)
	}
	if n := sessionCount(p); n != 3 {
		t.Errorf("%d sessions kept, want 3", n)
	}
}

// Idle sessions are forgotten by the pool's own timer, without any call,
// and their room is free again.
func TestIdleSessionsAreSwept(t *testing.T) {
	p, _ := startPool(t, func(c *Config) {
		c.MaxSessions = 2
		c.sessionIdle = 300 * time.Millisecond
		c.sessionSweep = 50 * time.Millisecond
	})
	for _, s := range []string{"a", "b"} {
		if _, err := sessionCall(p, s, "1"); err != nil {
			t.Fatal(err)
		}
	}
	_, err := sessionCall(p, "c", "1")
	wantOverloaded(t, "a third session with MaxSessions 2", err, "2 sessions")
	waitUntil(t, func() bool { return sessionCount(p) == 0 })
	if _, err := sessionCall(p, "c", "1"); err != nil {
		t.Errorf("a new session once the idle ones were swept: %v", err)
	}
}

// A session keeps a copy of its key, not the string it came in: that one
// may be a piece of a whole request's header block.
func TestSessionKeyIsACopy(t *testing.T) {
	p, _ := startPool(t, nil)
	block := strings.Repeat("h", 1<<20)
	key := block[1000:1256]
	if _, err := sessionCall(p, key, "1"); err != nil {
		t.Fatal(err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for k := range p.sessions {
		if k != key {
			t.Fatalf("session key %q", k)
		}
		if unsafe.StringData(k) == unsafe.StringData(key) {
			t.Error("the session key shares the request's memory")
		}
	}
}

// The payload bytes of calls waiting for a worker are capped: a call that
// would take them over QueueLimitBytes gets 503 naming the limit; smaller
// calls still fit, and every waiting call's bytes are given back.
func TestQueueLimitBytes(t *testing.T) {
	p, _ := startPool(t, func(c *Config) { c.QueueLimitBytes = 1000 })
	running := make(chan error, 1)
	go func() {
		_, err := callFn(p, 20*time.Second, "sleep", "1000")
		running <- err
	}()
	waitUntil(t, func() bool { return p.Stats().Busy == 1 })
	big := `"` + strings.Repeat("x", 598) + `"` // 600 bytes
	queued := make(chan error, 2)
	go func() {
		_, err := callFn(p, 20*time.Second, "echo", big)
		queued <- err
	}()
	waitUntil(t, func() bool { return p.waitingBytes.Load() == 600 })
	_, err := callFn(p, 20*time.Second, "echo", big)
	wantOverloaded(t, "a second 600-byte call behind one", err, "queue limit of 1000 bytes")
	go func() {
		_, err := callFn(p, 20*time.Second, "echo", `"small"`)
		queued <- err
	}()
	waitUntil(t, func() bool { return p.Stats().Queued == 2 })
	for _, ch := range []chan error{running, queued, queued} {
		if err := <-ch; err != nil {
			t.Error(err)
		}
	}
	if n := p.waitingBytes.Load(); n != 0 {
		t.Errorf("%d bytes still counted as waiting", n)
	}
	// Alone, a payload over the limit is refused too: it would be the queue.
	_, err = callFn(p, 5*time.Second, "echo", `"`+strings.Repeat("y", 1000)+`"`)
	wantOverloaded(t, "a call over the limit alone", err, "1000 bytes")
}
