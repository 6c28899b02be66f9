package test

import (
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pyfleet/pyfleet/lifecycle"
	"github.com/pyfleet/pyfleet/protocol"
)

func hostilePoolApp() string { return filepath.Join(repoRoot, "test", "apps", "hostile_pool.py") }

// TestHostileChannelLost: a function whose result is over the gRPC message
// limit (64 MB) makes the worker's gRPC end its stream to the node while the
// worker process lives on. The caller gets 500 WorkerLost at once, the
// worker is killed and reported terminated (reason channel_lost), then
// replaced (restarted), and the node serves with both workers again.
func TestHostileChannelLost(t *testing.T) {
	n := startNode(t, nodeOptions{app: hostilePoolApp(), workers: 2})
	nc := n.connect()
	ev := watchEvents(t, nc, "default")
	before := n.processes()

	start := time.Now()
	m, err := nc.Request(protocol.Subjects{}.Request("default", "huge"), []byte("65"), 60*time.Second)
	if err != nil {
		t.Fatalf("huge: %v", err)
	}
	e := protocol.ReplyError(m.Header, m.Data)
	if e == nil || e.Code != 500 || e.Type != "WorkerLost" {
		t.Fatalf("a 65 MB result: %v %q, want 500 WorkerLost", m.Header, m.Data)
	}
	// At once: the deadline is a minute; the loss takes the worker's
	// time to build 65 MB.
	if d := time.Since(start); d > 30*time.Second {
		t.Errorf("WorkerLost came %s after the request", d)
	}
	worker := m.Header.Get(protocol.HeaderWorker)
	ofWorker := func(e lifecycle.Event) bool { return e.Worker == worker }
	isLost := allOf(terminatedFor(lifecycle.ReasonChannelLost), ofWorker)
	lost := ev.waitFor(20*time.Second, isLost)
	isRestarted := allOf(kind(lifecycle.KindRestarted), ofWorker)
	restarted := ev.waitFor(20*time.Second, isRestarted)
	if firstIndex(ev, isRestarted) < firstIndex(ev, isLost) || !strings.Contains(restarted.Detail, strconv.Itoa(lost.PID)) {
		t.Errorf("restarted %+v does not follow terminated %+v", restarted, lost)
	}
	if n := ev.count(kind(lifecycle.KindCrashed)); n != 0 {
		t.Errorf("%d crashed events for a channel loss", n)
	}
	var old []lifecycle.Identity
	for _, id := range before {
		if id.PID == lost.PID {
			old = append(old, id)
		}
	}
	if len(old) != 1 {
		t.Fatalf("the lost worker, pid %d, was not among the node's processes before: %v", lost.PID, before)
	}
	assertGone(t, "the worker whose channel broke", old, 5*time.Second)
	assertStillServing(t, n, nc, 2)
}
