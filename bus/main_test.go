package bus_test

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

	"github.com/pyfleet/pyfleet/bus"
	"github.com/pyfleet/pyfleet/call"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// MustServer starts an embedded server with JetStream in a temporary
// directory on a random port, shut down when the test ends.
func MustServer(t testing.TB) *server.Server {
	t.Helper()
	srv, err := bus.StartEmbedded(bus.EmbeddedConfig{Listen: "127.0.0.1:0", StoreDir: t.TempDir()}, zaptest.NewLogger(t).Named("srv"))
	if err != nil {
		t.Fatalf("StartEmbedded: %v", err)
	}
	t.Cleanup(func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	})
	return srv
}

// MustConn connects to srv over TCP, closed when the test ends.
func MustConn(t testing.TB, srv *server.Server) *nats.Conn {
	t.Helper()
	nc, err := bus.Connect(bus.ConnConfig{URLs: srv.ClientURL(), Name: t.Name()}, zaptest.NewLogger(t).Named("conn"))
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// MustServe serves h as node in pool p, stopped when the test ends.
func MustServe(t testing.TB, nc *nats.Conn, node string, h call.Handler, mod ...func(*bus.ServiceConfig)) *bus.Service {
	t.Helper()
	cfg := bus.ServiceConfig{Pool: "p", Node: node, Version: "1.2.3"}
	for _, f := range mod {
		f(&cfg)
	}
	s, err := bus.Serve(nc, cfg, h, zaptest.NewLogger(t).Named(node))
	if err != nil {
		t.Fatalf("Serve: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := s.Stop(ctx); err != nil {
			t.Errorf("Stop: %v", err)
		}
	})
	return s
}

// fakeHandler is a call.Handler with a few functions that behave like the
// demo app's, and a record of what it ran.
type fakeHandler struct {
	worker string

	mu    sync.Mutex
	calls []*call.Request
}

func (h *fakeHandler) Functions() []call.Function {
	return []call.Function{
		{Name: "echo"},
		{Name: "raw", Raw: true},
		{Name: "sleep"},
		{Name: "fail"},
		{Name: "oops"},
		{Name: "shout"},
		{Name: "count", Stream: true},
		{Name: "countfail", Stream: true},
	}
}

func (h *fakeHandler) Call(ctx context.Context, req *call.Request, emit call.Emit) (call.Result, error) {
	h.mu.Lock()
	h.calls = append(h.calls, req)
	h.mu.Unlock()
	switch req.Function {
	case "echo", "raw":
		return call.Result{Worker: h.worker, Data: req.Payload}, nil
	case "sleep":
		ms, _ := strconv.Atoi(string(req.Payload))
		select {
		case <-time.After(time.Duration(ms) * time.Millisecond):
			return call.Result{Worker: h.worker, Data: []byte("null")}, nil
		case <-ctx.Done():
			return call.Result{}, ctx.Err()
		}
	case "fail":
		return call.Result{}, &call.Error{Code: call.CodeFailed, Type: "ValueError", Message: "boom\nsecond line", Worker: h.worker}
	case "oops":
		return call.Result{}, errors.New("pipe broke")
	case "shout": // an error message of payload bytes
		n, _ := strconv.Atoi(string(req.Payload))
		return call.Result{}, &call.Error{Code: call.CodeFailed, Type: "ValueError", Message: strings.Repeat("x", n), Worker: h.worker}
	case "count", "countfail":
		n, _ := strconv.Atoi(string(req.Payload))
		for i := range n {
			if err := emit(call.Chunk{Worker: h.worker, Data: []byte(strconv.Itoa(i))}); err != nil {
				return call.Result{}, err
			}
		}
		if req.Function == "countfail" {
			return call.Result{}, &call.Error{Code: call.CodeFailed, Type: "RuntimeError", Message: "generator raised", Worker: h.worker}
		}
		return call.Result{Worker: h.worker}, nil
	}
	return call.Result{}, call.Errorf(call.CodeNotFound, "NotFound", "no %s", req.Function)
}

// starterHandler is fakeHandler as a call.Starter, as pool.StartCall is to
// pool.Call: the service then starts a plain call without a goroutine of
// its own, and this fake runs it on one of its own, as the pool's stream
// receiver would answer it.
type starterHandler struct {
	*fakeHandler
	started atomic.Int32
	running sync.WaitGroup
}

type startedCall struct{ cancel context.CancelFunc }

func (r startedCall) Cancel() { r.cancel() }

func (h *starterHandler) StartCall(req *call.Request, done func(call.Result, error)) (call.Running, bool) {
	if req.Session != "" || req.Progress != nil {
		return nil, false
	}
	h.started.Add(1)
	ctx, cancel := context.WithDeadline(context.Background(), req.Deadline)
	h.running.Add(1)
	go func() {
		defer h.running.Done()
		defer cancel()
		done(h.Call(ctx, req, func(call.Chunk) error { return errors.New("not a streaming function") }))
	}()
	return startedCall{cancel}, true
}

func (h *fakeHandler) count() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.calls)
}

func (h *fakeHandler) requests() []*call.Request {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]*call.Request(nil), h.calls...)
}
