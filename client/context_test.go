package client_test

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/pyfleet/pyfleet/client"
)

// TestProgress: WithProgress gets the function's ctx.progress values while
// the call runs (the function waits for a file the test makes only once it
// has the first value), then the result.
func TestProgress(t *testing.T) {
	c := connect(t, client.Options{})
	gate := filepath.Join(t.TempDir(), "gate")
	var mu sync.Mutex
	var seen []map[string]int
	got := make(chan struct{}, 1)
	progress := func(v json.RawMessage) {
		var m map[string]int
		if err := json.Unmarshal(v, &m); err != nil {
			t.Errorf("progress %s: %v", v, err)
			return
		}
		mu.Lock()
		seen = append(seen, m)
		mu.Unlock()
		select {
		case got <- struct{}{}:
		default:
		}
	}
	done := make(chan error, 1)
	var n int
	go func() {
		done <- c.Call(bounded(t, 60*time.Second), "progressive", map[string]any{"n": 3, "gate": gate}, &n, client.WithProgress(progress))
	}()
	select {
	case <-got:
	case err := <-done:
		t.Fatalf("the call ended before any progress: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("no progress within 30 s")
	}
	if err := os.WriteFile(gate, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if n != 3 || len(seen) == 0 || seen[0]["done"] != 0 || seen[len(seen)-1]["done"] != 3 {
		t.Errorf("result %d, progress %v; want 3 and done 0 .. 3", n, seen)
	}
}

// TestCancelCall: cancelling a call's context tells the node, which cancels
// the async function (it sees ctx.cancelled) long before its deadline.
func TestCancelCall(t *testing.T) {
	c := connect(t, client.Options{})
	dir := t.TempDir()
	started, out := filepath.Join(dir, "started"), filepath.Join(dir, "out")
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- c.Call(ctx, "cancellable", map[string]string{"started": started, "out": out}, nil, client.WithTimeout(time.Minute))
	}()
	waitFor(t, "the function to start", func() bool { _, err := os.Stat(started); return err == nil })
	cancel()
	if err := <-done; err != context.Canceled {
		t.Errorf("Call returned %v, want context.Canceled", err)
	}
	waitFor(t, "the function to be cancelled", func() bool { _, err := os.Stat(out); return err == nil })
	if b, _ := os.ReadFile(out); string(b) != "cancelled" {
		t.Errorf("the function saw %q, want cancelled", b)
	}
}
