package main

import (
	"bytes"
	"context"
	"encoding/json"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"go.uber.org/goleak"

	"github.com/pyfleet/pyfleet/protocol"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// mustServer runs an embedded NATS server with JetStream on a free port for
// the duration of the test.
func mustServer(t *testing.T) *server.Server {
	t.Helper()
	s, err := server.NewServer(&server.Options{
		Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: t.TempDir(),
		NoLog: true, NoSigs: true,
	})
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
	return s
}

func mustConn(t *testing.T, s *server.Server) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(s.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// syncBuffer is a bytes.Buffer safe to read while a command still writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type result struct {
	code           int
	stdout, stderr string
}

// testApp is an app that sees no environment, so a NATS_URL in the
// developer's shell cannot change what a test talks to.
func testApp(stdin string, stdout, stderr *syncBuffer) *app {
	return newApp(strings.NewReader(stdin), stdout, stderr, func(string) string { return "" })
}

// submit runs the command in-process against s (nil: no --nats given).
func submit(t *testing.T, s *server.Server, stdin string, args ...string) result {
	t.Helper()
	var out, errb syncBuffer
	if s != nil {
		args = append([]string{"--nats", s.ClientURL()}, args...)
	}
	code := testApp(stdin, &out, &errb).run(t.Context(), args)
	return result{code, out.String(), errb.String()}
}

func (r result) want(t *testing.T, code int, stdout string) {
	t.Helper()
	if r.code != code || r.stdout != stdout {
		t.Fatalf("got exit %d, stdout %q, stderr %q; want exit %d, stdout %q", r.code, r.stdout, r.stderr, code, stdout)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func okHeader(node string) nats.Header {
	h := nats.Header{}
	h.Set(protocol.HeaderStatus, "ok")
	h.Set(protocol.HeaderNode, node)
	h.Set(protocol.HeaderWorker, "w1")
	return h
}

func errorReply(code int, typ, msg string) (nats.Header, []byte) {
	h := nats.Header{}
	h.Set(protocol.HeaderStatus, "error")
	h.Set(protocol.HeaderNode, "node-a")
	h.Set(protocol.HeaderWorker, "w1")
	h.Set(protocol.HeaderError, msg)
	h.Set(protocol.HeaderErrorCode, strconv.Itoa(code))
	body, _ := json.Marshal(map[string]any{"error": map[string]any{"code": code, "type": typ, "message": msg}})
	return h, body
}

// fakeNode answers requests of pool "default" the way a poolnode does:
//
//	echo       the body back; the request's session, timeout and subject in Fake-* headers
//	fail       500 RuntimeError
//	count      {"n":N} streams 0..N-1
//	countfail  streams 0, 1, then ends with 500 ValueError
//	late       408
//	flaky      503 on every even-numbered request
//	silent     never answers
//	vanish     one heartbeat, then nothing: a node that died holding the call
func fakeNode(t *testing.T, nc *nats.Conn, node string) {
	t.Helper()
	var served atomic.Int64
	handler := func(m *nats.Msg) {
		n := served.Add(1)
		fn := m.Subject[strings.LastIndexByte(m.Subject, '.')+1:]
		reply := func(h nats.Header, data []byte) {
			if err := nc.PublishMsg(&nats.Msg{Subject: m.Reply, Header: h, Data: data}); err != nil {
				t.Error(err)
			}
		}
		chunk := func(data string) {
			h := okHeader(node)
			h.Set(protocol.HeaderStream, "chunk")
			reply(h, []byte(data))
		}
		switch fn {
		case "echo":
			h := okHeader(node)
			h.Set("Fake-Session", m.Header.Get(protocol.HeaderSession))
			h.Set("Fake-Timeout", m.Header.Get(protocol.HeaderTimeout))
			h.Set("Fake-Subject", m.Subject)
			reply(h, m.Data)
		case "fail":
			reply(errorReply(500, "RuntimeError", "this function always fails"))
		case "count":
			var p struct{ N int }
			_ = json.Unmarshal(m.Data, &p)
			for i := range p.N {
				chunk(strconv.Itoa(i))
			}
			h := okHeader(node)
			h.Set(protocol.HeaderStream, "end")
			reply(h, nil)
		case "countfail":
			chunk("0")
			chunk("1")
			h, body := errorReply(500, "ValueError", "boom")
			h.Set(protocol.HeaderStream, "end")
			reply(h, body)
		case "late":
			reply(errorReply(408, "DeadlineExceeded", "deadline passed after 1000 ms"))
		case "flaky":
			if n%2 == 0 {
				reply(errorReply(503, "Overloaded", "queue full"))
				return
			}
			reply(okHeader(node), m.Data)
		case "silent":
		case "vanish":
			// Takes the call, says so with one heartbeat, and dies.
			h := okHeader(node)
			h.Set(protocol.HeaderStream, "heartbeat")
			reply(h, nil)
		}
	}
	if _, err := nc.QueueSubscribe("pyfleet.req.default.*", "pyfleet", handler); err != nil {
		t.Fatal(err)
	}
	if _, err := nc.Subscribe("pyfleet.node."+node+".default.*", handler); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
}

// withTimeout bounds a test step that could otherwise hang.
func withTimeout(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}
