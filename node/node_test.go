package node

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

	"github.com/pyfleet/pyfleet/bus"
	"github.com/pyfleet/pyfleet/lifecycle"
)

func TestMain(m *testing.M) {
	// node.Run starts its guardian (and in ModePIDNS each worker's init) by
	// re-executing this binary.
	if len(os.Args) > 1 && os.Args[1] == lifecycle.GuardianArg {
		os.Exit(lifecycle.GuardianMain(os.Args[2:], os.Stdin, os.Stderr))
	}
	if len(os.Args) > 1 && os.Args[1] == lifecycle.InitArg {
		os.Exit(lifecycle.InitMain(os.Args[2:]))
	}
	goleak.VerifyTestMain(m)
}

// TestRunServesAndStopsEverything runs a whole node in this process: it
// serves, and once its ctx ends Run returns with every goroutine it started
// gone (goleak checks after the test) and every worker dead.
func TestRunServesAndStopsEverything(t *testing.T) {
	python := os.Getenv("PYFLEET_TEST_PYTHON")
	if python == "" {
		python, _ = filepath.Abs("../python/.venv/bin/python")
	}
	if _, err := os.Stat(python); err != nil {
		t.Fatalf("no Python venv at %s: run `make venv`", python)
	}
	t.Setenv("GORACE", "atexit_sleep_ms=0") // the guardian is this test binary
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	state, err := os.MkdirTemp("", "pfn")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(state)

	cfg := Defaults()
	cfg.Listen = addr
	cfg.Node = "inproc"
	cfg.Workers = 2
	cfg.Python = python
	cfg.App = "../python/examples/demo.py"
	cfg.StateDir = state
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- Run(ctx, cfg, zaptest.NewLogger(t), make(chan struct{})) }()

	nc := connectWhenUp(t, "nats://"+addr)
	defer nc.Close()
	var msg *nats.Msg
	deadline := time.Now().Add(30 * time.Second)
	for {
		msg, err = nc.Request("pyfleet.req.default.echo", []byte(`[1]`), 5*time.Second)
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond) // "no responders" until the service is up
	}
	if err != nil || string(msg.Data) != "[1]" {
		t.Fatalf("echo: %v", err)
	}
	nc.Close()

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not return after its ctx ended")
	}
}

func connectWhenUp(t *testing.T, url string) *nats.Conn {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		nc, err := nats.Connect(url)
		if err == nil {
			return nc
		}
		if time.Now().After(deadline) {
			t.Fatalf("no NATS at %s: %v", url, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestRunWaitsForNATS: a --nats server that stays unreachable ends Run
// after ConnectWait with a runtime error (exit 1) naming the URL, not a
// configuration error; a stop during the wait is a clean return.
func TestRunWaitsForNATS(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()

	cfg := validConfig(t)
	cfg.NATS = "nats://" + addr
	cfg.ConnectWait = 500 * time.Millisecond
	err = Run(context.Background(), cfg, zaptest.NewLogger(t), make(chan struct{}))
	if err == nil || errors.Is(err, ErrConfig) || !errors.Is(err, bus.ErrUnreachable) || !strings.Contains(err.Error(), addr) {
		t.Errorf("Run = %v, want a runtime error naming %s", err, addr)
	}

	cfg = validConfig(t)
	cfg.NATS = "nats://" + addr
	cfg.ConnectWait = time.Hour
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := Run(ctx, cfg, zaptest.NewLogger(t), make(chan struct{})); err != nil {
		t.Errorf("Run stopped during the wait = %v, want nil", err)
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("Run took %s to stop during the wait", took)
	}
}
