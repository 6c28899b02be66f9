package client_test

import (
	"context"
	"errors"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/pyfleet/pyfleet/client"
	"github.com/pyfleet/pyfleet/lifecycle"
)

// The client's Event has lifecycle.Event's fields, in order, with their
// types: this conversion compiles only while that holds.
var _ = client.Event(lifecycle.Event{})

func TestEventKinds(t *testing.T) {
	want := []string{
		lifecycle.KindNodeStarted, lifecycle.KindNodeStopping, lifecycle.KindNodeStopped,
		lifecycle.KindSpawned, lifecycle.KindReady, lifecycle.KindSpawnFailed,
		lifecycle.KindTerminated, lifecycle.KindCrashed, lifecycle.KindRestarted,
		lifecycle.KindOrphanReaped, lifecycle.KindCrashLoop,
	}
	if got := client.EventKinds(); !slices.Equal(got, want) {
		t.Fatalf("client.EventKinds() = %v, lifecycle has %v", got, want)
	}
}

// TestErrorIs: each code matches its sentinel and no other; 500 matches
// ErrWorkerLost only with the type WorkerLost.
func TestErrorIs(t *testing.T) {
	sentinels := map[error]*client.Error{
		client.ErrBadRequest:       {Code: 400, Type: "InvalidJobId"},
		client.ErrNotFound:         {Code: 404, Type: "NotFound"},
		client.ErrDeadlineExceeded: {Code: 408, Type: "DeadlineExceeded"},
		client.ErrSessionLost:      {Code: 410, Type: "SessionLost"},
		client.ErrPayloadTooLarge:  {Code: 413, Type: "TooLarge"},
		client.ErrWorkerLost:       {Code: 500, Type: "WorkerLost"},
		client.ErrUnavailable:      {Code: 503, Type: "Draining"},
	}
	for target := range sentinels {
		for s, e := range sentinels {
			if got := errors.Is(e, target); got != (s == target) {
				t.Errorf("errors.Is(%v, %v) = %v", e, target, got)
			}
		}
		if errors.Is(&client.Error{Code: 500, Type: "ValueError"}, target) {
			t.Errorf("a function's exception matches %v", target)
		}
	}
	e := &client.Error{Code: 500, Type: "ValueError", Message: "boom"}
	if e.Error() != "500 ValueError: boom" {
		t.Errorf("Error() = %q", e.Error())
	}
	var ce *client.Error
	if wrapped := errors.Join(context.Canceled, e); !errors.As(wrapped, &ce) || ce != e {
		t.Error("errors.As does not find a wrapped *Error")
	}
}

// TestNoServerInClient: package client, and submit built on it, stay small
// NATS clients: neither the NATS server nor any package of the node is in
// their dependencies.
func TestNoServerInClient(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "github.com/pyfleet/pyfleet/client", "github.com/pyfleet/pyfleet/cmd/submit").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	deps := strings.Fields(string(out))
	if !slices.Contains(deps, "github.com/nats-io/nats.go") {
		t.Fatalf("go list printed no nats.go, so it did not list the deps:\n%s", out)
	}
	for _, d := range deps {
		for _, banned := range []string{
			"github.com/nats-io/nats-server",
			"github.com/pyfleet/pyfleet/bus", "github.com/pyfleet/pyfleet/node", "github.com/pyfleet/pyfleet/pool",
			"github.com/pyfleet/pyfleet/lifecycle", "google.golang.org/grpc",
		} {
			if d == banned || strings.HasPrefix(d, banned+"/") {
				t.Errorf("%s is a dependency of client or cmd/submit", d)
			}
		}
	}
}
