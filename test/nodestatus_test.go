package test

import (
	"context"
	"errors"
	"syscall"
	"testing"
	"time"

	"github.com/pyfleet/pyfleet/client"
	"github.com/pyfleet/pyfleet/lifecycle"
)

// TestNodeStatusDetail: two real nodes on one bus answer the status
// endpoint (docs/protocol.md, "Node status") with their workers (host pids
// of live interpreters, tree RSS, last event) and the figures of the calls
// made; a recycle request replaces a worker; a drain request stops a node.
func TestNodeStatusDetail(t *testing.T) {
	a := startNode(t, nodeOptions{workers: 2})
	b := startNode(t, nodeOptions{workers: 1, extra: []string{"--nats", a.url}})
	cl, err := client.Connect(a.url, client.Options{Pool: "default"})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	for i := range 5 {
		var out any
		if err := cl.Call(ctx, "echo", map[string]int{"i": i}, &out); err != nil {
			t.Fatal(err)
		}
	}
	var failed *client.Error
	if err := cl.Call(ctx, "fail", map[string]string{"message": "boom"}, nil); !errors.As(err, &failed) {
		t.Fatalf("fail: %v", err)
	}

	nodes, err := cl.Nodes(ctx, client.WithDetail(), client.WithTimeout(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if len(nodes) != 2 {
		t.Fatalf("want 2 nodes, got %+v", nodes)
	}
	var calls, errs uint64
	for _, n := range nodes {
		d := n.Detail
		if d == nil {
			t.Fatalf("node %s: no detail", n.Node)
		}
		want := map[string]int{a.name: 2, b.name: 1}[n.Node]
		if len(d.Workers) != want || d.Load.Workers != want || d.Draining || !d.Jobs || d.Run == "" {
			t.Fatalf("node %s: %+v", n.Node, d)
		}
		for _, w := range d.Workers {
			if !alive(w.PID) || w.RSS == 0 || w.AgeS <= 0 || w.LastEvent == nil || w.LastEvent.Kind != lifecycle.KindReady {
				t.Fatalf("node %s worker %+v (last event %+v)", n.Node, w, w.LastEvent)
			}
			if w.State != "idle" {
				t.Fatalf("worker %s state %q with nothing running", w.Name, w.State)
			}
		}
		e := d.Functions["echo"]
		calls += e.Calls
		if e.Calls > 0 && (e.Recent != int(e.Calls) || e.P50Ms <= 0 || e.P99Ms < e.P50Ms) {
			t.Fatalf("node %s echo figures %+v", n.Node, e)
		}
		errs += d.Functions["fail"].Errors["500"]
	}
	if calls != 5 || errs != 1 {
		t.Fatalf("echo calls %d, fail errors %d across nodes; want 5 and 1", calls, errs)
	}

	// A crashed worker: its last event says so until its replacement's.
	ev := watchEvents(t, a.connect(), "default")
	old := nodes[0].Detail.Workers[0]
	if nodes[0].Node != a.name {
		old = nodes[1].Detail.Workers[0]
	}
	if err := syscall.Kill(old.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	ev.waitFor(30*time.Second, func(e lifecycle.Event) bool { return e.Kind == lifecycle.KindReady && e.Worker == old.Name })
	st := statusOf(t, cl, a.name)
	for _, w := range st.Workers {
		if w.Name == old.Name && (w.PID == old.PID || !alive(w.PID)) {
			t.Fatalf("worker %s not replaced: %+v", w.Name, w)
		}
	}

	// Recycle: the worker is replaced with reason recycle.
	if err := cl.Recycle(ctx, "default", a.name, "w2", "test"); err != nil {
		t.Fatal(err)
	}
	ev.waitFor(30*time.Second, func(e lifecycle.Event) bool {
		return e.Kind == lifecycle.KindTerminated && e.Worker == "w2" && e.Reason == lifecycle.ReasonRecycle
	})
	var ce *client.ControlError
	if err := cl.Recycle(ctx, "default", a.name, "w99", "test"); !errors.As(err, &ce) {
		t.Fatalf("recycle of no worker: %v", err)
	}
	if !a.hasLog("control request", map[string]string{"verb": "recycle", "by": "test"}) {
		t.Fatal("control request not logged with who asked")
	}

	// Drain: node b stops by itself, cleanly.
	if err := cl.Drain(ctx, "default", b.name, "test"); err != nil {
		t.Fatal(err)
	}
	if code := b.wait(30 * time.Second); code != 0 {
		t.Fatalf("drained node exited %d", code)
	}
}

func statusOf(t *testing.T, cl *client.Client, node string) client.NodeStatus {
	t.Helper()
	sts, err := cl.NodeStatuses(context.Background(), client.WithTimeout(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range sts {
		if s.Node == node {
			return s
		}
	}
	t.Fatalf("node %s did not answer its status: %+v", node, sts)
	return client.NodeStatus{}
}

func alive(pid int) bool { return pid > 0 && syscall.Kill(pid, 0) == nil }
