package main

import (
	"context"
	"encoding/json"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pyfleet/pyfleet/bus"
	"github.com/pyfleet/pyfleet/call"
)

// These tests put submit in front of the real NATS side of a node (bus), with
// a fake pool behind it, so that the two halves of the wire protocol cannot
// drift apart unnoticed.

type fakePool struct{}

func (fakePool) Functions() []call.Function {
	return []call.Function{{Name: "echo"}, {Name: "fail"}, {Name: "whoami"}, {Name: "sleep"}, {Name: "count", Stream: true}}
}

func (fakePool) Call(ctx context.Context, req *call.Request, emit call.Emit) (call.Result, error) {
	switch req.Function {
	case "echo":
		return call.Result{Worker: "w1", Data: req.Payload}, nil
	case "fail":
		return call.Result{}, &call.Error{Code: 500, Type: "RuntimeError", Message: "this function always fails", Worker: "w1"}
	case "whoami":
		b, _ := json.Marshal(req.Session)
		return call.Result{Worker: "w1", Data: b}, nil
	case "sleep":
		<-ctx.Done()
		return call.Result{}, ctx.Err()
	case "count":
		for i := range 3 {
			if err := emit(call.Chunk{Worker: "w1", Data: []byte(strconv.Itoa(i))}); err != nil {
				return call.Result{}, err
			}
		}
		return call.Result{Worker: "w1"}, nil
	}
	return call.Result{}, call.Errorf(404, "NotFound", "no function %q", req.Function)
}

func TestAgainstBus(t *testing.T) {
	s := mustServer(t)
	svc, err := bus.Serve(mustConn(t, s), bus.ServiceConfig{
		Pool: "default", Node: "node-a",
		Stats: func() any { return map[string]int{"workers": 2, "busy": 0, "queued": 0, "handled": 7, "errors": 1} },
	}, fakePool{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = svc.Stop(withTimeout(t, 5*time.Second)) })

	tests := []struct {
		name   string
		args   []string
		code   int
		stdout string
		stderr string
	}{
		{"ok", []string{"call", "echo", `{"a":1}`}, 0, "{\"a\":1}\n", ""},
		{"error", []string{"call", "fail"}, 1, "", "500 RuntimeError: this function always fails\n"},
		{"stream", []string{"call", "count"}, 0, "0\n1\n2\n", ""},
		{"session", []string{"call", "--session", "s1", "whoami"}, 0, "\"s1\"\n", ""},
		{"node subject", []string{"call", "--node", "node-a", "echo", "2"}, 0, "2\n", ""},
		{"deadline", []string{"call", "--timeout", "200ms", "sleep"}, 3, "", "408 "},
		{"unknown function", []string{"call", "nosuch"}, 1, "", "404 "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := submit(t, s, "", tt.args...)
			r.want(t, tt.code, tt.stdout)
			if !strings.HasPrefix(r.stderr, tt.stderr) || tt.stderr == "" && r.stderr != "" {
				t.Fatalf("stderr %q, want it to start with %q", r.stderr, tt.stderr)
			}
		})
	}

	r := submit(t, s, "", "nodes", "--wait", "300ms", "--json")
	var rows []nodeRow
	if err := json.Unmarshal([]byte(r.stdout), &rows); err != nil || r.code != 0 {
		t.Fatalf("exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	if len(rows) != 1 || rows[0].Node != "node-a" || rows[0].Pool != "default" ||
		rows[0].Workers == nil || *rows[0].Workers != 2 || *rows[0].Handled != 7 {
		t.Fatalf("got %s", r.stdout)
	}

	rep := benchJSON(t, submit(t, s, "", "bench", "-n", "50", "-c", "4", "--json", "echo"))
	if rep.Requests != 50 || rep.OK != 50 {
		t.Fatalf("got %+v", rep)
	}
}
