package ratelimit

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

	"github.com/pyfleet/pyfleet/bus"
	"github.com/pyfleet/pyfleet/call"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

type echo struct{}

func (echo) Functions() []call.Function {
	return []call.Function{{Name: "slow", RateLimit: "50/s"}, {Name: "free"}}
}

func (echo) Call(_ context.Context, req *call.Request, _ call.Emit) (call.Result, error) {
	return call.Result{Data: req.Payload}, nil
}

// TestSlotsSharedAcrossLimiters: two limiters on one bucket (two nodes of
// a pool) reserving at once never share a slot nor come closer than one
// interval: the compare-and-set makes one of two racing nodes read again.
func TestSlotsSharedAcrossLimiters(t *testing.T) {
	srv, err := bus.StartEmbedded(bus.EmbeddedConfig{Listen: "127.0.0.1:0", StoreDir: t.TempDir()}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { srv.Shutdown(); srv.WaitForShutdown() }()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var lims []*Limiter
	for range 2 {
		nc, err := bus.Connect(bus.ConnConfig{URLs: srv.ClientURL()}, zaptest.NewLogger(t))
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		l, err := New(ctx, nc, Config{Pool: "p"}, echo{}.Functions(), zaptest.NewLogger(t))
		if err != nil {
			t.Fatal(err)
		}
		if l.kv == nil {
			t.Fatal("no bucket: the limit would be per node")
		}
		lims = append(lims, l)
	}
	const iv, each = 20 * time.Millisecond, 25
	var mu sync.Mutex
	var slots []time.Time
	var wg sync.WaitGroup
	for _, l := range lims {
		for range 4 {
			wg.Go(func() {
				for range each {
					s, err := l.reserve(ctx, "slow", iv, time.Time{})
					if err != nil {
						t.Error(err)
						return
					}
					mu.Lock()
					slots = append(slots, s)
					mu.Unlock()
				}
			})
		}
	}
	wg.Wait()
	slices.SortFunc(slots, func(a, b time.Time) int { return a.Compare(b) })
	if len(slots) != 2*4*each {
		t.Fatalf("%d slots, want %d", len(slots), 2*4*each)
	}
	for i := 1; i < len(slots); i++ {
		if gap := slots[i].Sub(slots[i-1]); gap < iv {
			t.Fatalf("slots %d and %d are %v apart, less than the interval %v", i-1, i, gap, iv)
		}
	}
}

// TestWrap: a limited function waits for its slot, an unlimited one does
// not, and a slot past the call's deadline is refused at once with a 503
// that names the function.
func TestWrap(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	l, err := New(ctx, nil, Config{Pool: "p"}, echo{}.Functions(), zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	h := l.Wrap(echo{})
	start := time.Now()
	for range 3 {
		if res, err := h.Call(ctx, &call.Request{Function: "slow", Payload: []byte("1")}, nil); err != nil || string(res.Data) != "1" {
			t.Fatalf("slow: %v %v", res, err)
		}
	}
	// Three slots of 20 ms are taken, the first no earlier than start.
	l.mu.Lock()
	next := l.local["slow"]
	l.mu.Unlock()
	if d := next.Sub(start); d < 60*time.Millisecond {
		t.Fatalf("the next slot is %v after the first call, want three intervals (60ms) at least", d)
	}
	if _, ok := l.local["free"]; ok {
		t.Fatal("free has a slot: it has no limit")
	}
	short, cancelShort := context.WithDeadline(ctx, time.Now())
	defer cancelShort()
	l.mu.Lock()
	l.local["slow"] = time.Now().Add(time.Hour)
	l.mu.Unlock()
	_, err = h.Call(short, &call.Request{Function: "slow"}, nil)
	var ce *call.Error
	if !errors.As(err, &ce) || ce.Code != call.CodeUnavailable || !strings.Contains(ce.Message, "function slow is at its rate limit") {
		t.Fatalf("slot after the deadline: %v", err)
	}
	if l.Waiting() != 0 {
		t.Fatalf("Waiting = %d after every call returned", l.Waiting())
	}
}

// starter is echo that can start a call without Call's goroutine, as
// pool.StartCall does; done is called before StartCall returns.
type starter struct {
	echo
	started []string
}

type running struct{}

func (running) Cancel() {}

func (s *starter) StartCall(req *call.Request, done func(call.Result, error)) (call.Running, bool) {
	s.started = append(s.started, req.Function)
	done(call.Result{Data: req.Payload}, nil)
	return running{}, true
}

// TestWrapStartsUnlimitedCalls: through the wrapper, a function without a
// limit is still started by a handler that can (call.Starter); a limited
// one never is, as it must wait for its slot; and a handler that cannot
// start calls is not made to look as if it could.
func TestWrapStartsUnlimitedCalls(t *testing.T) {
	l, err := New(context.Background(), nil, Config{Pool: "p"}, echo{}.Functions(), zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	inner := &starter{}
	s, ok := l.Wrap(inner).(call.Starter)
	if !ok {
		t.Fatal("the wrapper of a call.Starter is no call.Starter")
	}
	var got []byte
	if _, ok := s.StartCall(&call.Request{Function: "free", Payload: []byte("7")}, func(res call.Result, err error) { got = res.Data }); !ok || string(got) != "7" {
		t.Fatalf("free: started %v, result %q", ok, got)
	}
	if _, ok := s.StartCall(&call.Request{Function: "slow"}, func(call.Result, error) { t.Error("done called for a call not started") }); ok {
		t.Fatal("slow, a limited function, was started without waiting for its slot")
	}
	if !slices.Equal(inner.started, []string{"free"}) {
		t.Fatalf("the handler started %v, want [free]", inner.started)
	}
	plain, _ := l.Wrap(echo{}).(call.Starter)
	if _, ok := plain.StartCall(&call.Request{Function: "free"}, func(call.Result, error) { t.Error("done called") }); ok {
		t.Fatal("a call started through a handler that cannot start calls")
	}
}

func TestNewRefusesABadLimit(t *testing.T) {
	_, err := New(context.Background(), nil, Config{Pool: "p"}, []call.Function{{Name: "hurry", RateLimit: "fast"}}, nil)
	if err == nil || !strings.Contains(err.Error(), `function hurry: rate limit "fast"`) {
		t.Fatalf("New: %v, want an error naming the function", err)
	}
}

// BenchmarkReserveKV is what the limit adds to a call of a limited
// function when no wait is needed: a get and a compare-and-set on the
// bucket of an embedded server (docs/benchmarks.md quotes it).
func BenchmarkReserveKV(b *testing.B) {
	srv, err := bus.StartEmbedded(bus.EmbeddedConfig{Listen: "127.0.0.1:0", StoreDir: b.TempDir()}, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer func() { srv.Shutdown(); srv.WaitForShutdown() }()
	nc, err := bus.Connect(bus.ConnConfig{URLs: srv.ClientURL()}, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer nc.Close()
	ctx := context.Background()
	l, err := New(ctx, nc, Config{Pool: "p"}, []call.Function{{Name: "f", RateLimit: "1000000000/s"}}, nil)
	if err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for b.Loop() {
		if _, err := l.reserve(ctx, "f", time.Nanosecond, time.Time{}); err != nil {
			b.Fatal(err)
		}
	}
}
