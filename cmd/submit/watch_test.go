package main

import (
	"context"
	"encoding/json"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/pyfleet/pyfleet/client"
	"github.com/pyfleet/pyfleet/lifecycle"
)

// startWatch runs `submit watch args...` until the returned stop is called,
// which returns its exit status. It returns once the watch is subscribed.
func startWatch(t *testing.T, s *server.Server, out *syncBuffer, probeSubject string, args ...string) (stop func() int) {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	var errb syncBuffer
	done := make(chan int, 1) // the exit status; received once, by stop
	go func() {
		done <- testApp("", out, &errb).run(ctx, append([]string{"--nats", s.ClientURL(), "watch"}, args...))
	}()
	var (
		stopped bool
		code    int
	)
	stop = func() int {
		if !stopped {
			stopped = true
			cancel()
			code = <-done
			if errb.String() != "" {
				t.Errorf("stderr %q", errb.String())
			}
		}
		return code
	}
	t.Cleanup(func() { stop() })
	waitFor(t, "the watch to subscribe", func() bool {
		return s.GlobalAccount().SubscriptionInterest(probeSubject)
	})
	return stop
}

func publishEvent(t *testing.T, s *server.Server, ev lifecycle.Event) {
	t.Helper()
	nc := mustConn(t, s)
	body, err := json.Marshal(ev)
	if err != nil {
		t.Fatal(err)
	}
	if err := nc.Publish("pyfleet.evt."+ev.Pool+"."+ev.Node+"."+ev.Kind, body); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
}

func TestWatchFilters(t *testing.T) {
	s := mustServer(t)
	var out syncBuffer
	stop := startWatch(t, s, &out, "pyfleet.evt.default.node-a.crashed", "--pool", "default", "--kind", "crashed")

	ts := time.Date(2026, 1, 2, 14, 3, 7, 123456789, time.Local)
	sigkill := 0
	publishEvent(t, s, lifecycle.Event{Kind: "spawned", TS: ts, Pool: "default", Node: "node-a", Worker: "w3", PID: 1234})
	publishEvent(t, s, lifecycle.Event{Kind: "crashed", TS: ts, Pool: "gpu", Node: "node-b", Worker: "w1", PID: 99})
	publishEvent(t, s, lifecycle.Event{Kind: "crashed", TS: ts, Pool: "default", Node: "node-a", Worker: "w3", PID: 1234, Signal: "SIGKILL"})
	publishEvent(t, s, lifecycle.Event{Kind: "crashed", TS: ts, Pool: "default", Node: "node-a", Worker: "w4", ExitCode: &sigkill, Detail: "last one"})
	waitFor(t, "the last event", func() bool { return strings.Contains(out.String(), "w4") })
	if code := stop(); code != 0 {
		t.Fatalf("watch exited %d after a cancel, want 0", code)
	}

	want := []string{
		"14:03:07.123 node-a/w3 crashed pid=1234 signal=SIGKILL",
		`14:03:07.123 node-a/w4 crashed exit_code=0 detail="last one"`,
	}
	if got := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n"); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("got lines\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func TestWatchAllPoolsJSON(t *testing.T) {
	s := mustServer(t)
	var out syncBuffer
	stop := startWatch(t, s, &out, "pyfleet.evt.any.node.ready", "--json")

	ev := lifecycle.Event{Kind: "ready", TS: time.Now().UTC(), Pool: "gpu", Node: "node-b", Worker: "w2", PID: 7}
	publishEvent(t, s, ev)
	waitFor(t, "the event", func() bool { return strings.Contains(out.String(), "\n") })
	stop()

	want, _ := json.Marshal(ev)
	if out.String() != string(want)+"\n" {
		t.Fatalf("got %q, want %q", out.String(), want)
	}
}

func TestFormatEventShowsPoolWhenWatchingAll(t *testing.T) {
	ev := lifecycle.Event{Kind: "orphan_reaped", TS: time.Date(2026, 1, 2, 3, 4, 5, 0, time.Local), Pool: "gpu", Node: "node-b", PID: 42, Run: "r1"}
	got := formatEvent((*client.Event)(&ev), true)
	if !regexp.MustCompile(`^03:04:05\.000 node-b orphan_reaped pool=gpu pid=42 run=r1$`).MatchString(got) {
		t.Fatalf("got %q", got)
	}
}
