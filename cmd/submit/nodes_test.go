package main

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
)

// fakeService registers a micro service named like a node's, with two
// endpoints, so the stats have something to add up (or not).
func fakeService(t *testing.T, nc *nats.Conn, pool, node string, load map[string]int) micro.Service {
	t.Helper()
	cfg := micro.Config{
		Name:     "pyfleet",
		Version:  "0.1.0",
		Metadata: map[string]string{"pool": pool, "node": node},
	}
	if load != nil {
		// The node that reports its load also says how it keeps its
		// workers; the other is an older node that says neither.
		cfg.Metadata["containment"] = "cgroup"
	}
	if load != nil {
		cfg.StatsHandler = func(*micro.Endpoint) any { return load }
	}
	svc, err := micro.AddService(nc, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = svc.Stop() })
	for _, fn := range []string{"echo", "fail"} {
		err := svc.AddEndpoint(fn, micro.HandlerFunc(func(r micro.Request) {
			if fn == "fail" {
				_ = r.Error("500", "this function always fails", nil)
				return
			}
			_ = r.Respond(r.Data())
		}), micro.WithEndpointSubject("pyfleet.req."+pool+"."+fn), micro.WithEndpointQueueGroup("pyfleet"))
		if err != nil {
			t.Fatal(err)
		}
	}
	return svc
}

func TestNodes(t *testing.T) {
	s := mustServer(t)
	nc := mustConn(t, s)
	fakeService(t, nc, "default", "node-a", map[string]int{"workers": 4, "busy": 1, "queued": 2, "handled": 10, "errors": 1})
	fakeService(t, nc, "gpu", "node-b", nil)
	for _, subj := range []string{"pyfleet.req.gpu.echo", "pyfleet.req.gpu.echo", "pyfleet.req.gpu.fail"} {
		if _, err := nc.Request(subj, nil, time.Second); err != nil && !errors.Is(err, nats.ErrTimeout) {
			t.Fatal(err)
		}
	}

	r := submit(t, s, "", "nodes", "--wait", "300ms")
	if r.code != 0 {
		t.Fatalf("exit %d, stderr %q", r.code, r.stderr)
	}
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	if len(lines) != 3 {
		t.Fatalf("want a header and two nodes, got\n%s", r.stdout)
	}
	for i, want := range [][]string{
		{"NODE", "POOL", "WORKERS", "BUSY", "QUEUED", "HANDLED", "ERRORS", "UPTIME", "CONTAINMENT"},
		{"node-a", "default", "4", "1", "2", "10", "1"},
		{"node-b", "gpu", "-", "-", "-", "3", "1"},
	} {
		if got := strings.Fields(lines[i]); strings.Join(got[:len(want)], " ") != strings.Join(want, " ") {
			t.Errorf("line %d is %q, want it to start with %q", i, lines[i], want)
		}
	}
	// The last column: the node's containment, "-" where it does not say.
	for i, want := range map[int]string{1: "cgroup", 2: "-"} {
		if got := strings.Fields(lines[i]); got[len(got)-1] != want {
			t.Errorf("line %d is %q, want containment %s last", i, lines[i], want)
		}
	}

	r = submit(t, s, "", "nodes", "--wait", "300ms", "--pool", "gpu", "--json")
	if r.code != 0 {
		t.Fatalf("exit %d, stderr %q", r.code, r.stderr)
	}
	var rows []nodeRow
	if err := json.Unmarshal([]byte(r.stdout), &rows); err != nil {
		t.Fatalf("%v in %s", err, r.stdout)
	}
	if len(rows) != 1 || rows[0].Node != "node-b" || rows[0].Workers != nil || *rows[0].Handled != 3 || *rows[0].Errors != 1 ||
		rows[0].Containment != "" || strings.Contains(r.stdout, "containment") {
		t.Fatalf("got %s", r.stdout)
	}
	r = submit(t, s, "", "nodes", "--wait", "300ms", "--pool", "default", "--json")
	var a []nodeRow
	if err := json.Unmarshal([]byte(r.stdout), &a); err != nil || len(a) != 1 || a[0].Containment != "cgroup" {
		t.Fatalf("--json of node-a: %v\n%s", err, r.stdout)
	}

	r = submit(t, s, "", "nodes", "--wait", "300ms", "--pool", "none")
	r.want(t, 3, "")
	if !strings.Contains(r.stderr, "no node of pool none answered") {
		t.Fatalf("stderr %q", r.stderr)
	}
}

func TestNodesNone(t *testing.T) {
	s := mustServer(t)
	r := submit(t, s, "", "nodes", "--json")
	r.want(t, 3, "[]\n")
	if !strings.Contains(r.stderr, "no node answered") {
		t.Fatalf("stderr %q", r.stderr)
	}
}
