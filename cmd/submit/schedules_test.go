package main

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/pyfleet/pyfleet/bus"
	"github.com/pyfleet/pyfleet/protocol"
)

func TestSchedulesCommand(t *testing.T) {
	s := mustServer(t)
	nc := mustConn(t, s)
	ctx := withTimeout(t, 30*time.Second)
	// The streams as a node makes them: schedules need its jobs stream.
	if err := bus.EnsureStreams(ctx, nc, "", zap.NewNop()); err != nil {
		t.Fatal(err)
	}

	submit(t, s, "", "schedules").want(t, 0, "NAME  CRON  FUNCTION  PAYLOAD  SINCE\n")
	submit(t, s, "", "schedules", "add", "tick", "*/5 * * * *", "echo", `{"a":1}`).
		want(t, 0, "scheduled tick: */5 * * * * (0 */5 * * * *) echo\n")
	r := submit(t, s, "", "schedules", "list", "--json")
	var got map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &got); r.code != 0 || err != nil || got["name"] != "tick" ||
		got["cron"] != "*/5 * * * *" || got["function"] != "echo" || got["payload"].(map[string]any)["a"] != 1.0 {
		t.Fatalf("list --json: %+v (%v), stderr %q", got, err, r.stderr)
	}
	if r := submit(t, s, "", "schedules"); r.code != 0 || !strings.Contains(r.stdout, "\ntick  */5 * * * *  echo      {\"a\":1}") {
		t.Fatalf("list: %q %q", r.stdout, r.stderr)
	}
	if r := submit(t, s, "", "schedules", "add", "bad", "* *", "echo"); r.code == 0 || !strings.Contains(r.stderr, `cron "* *": 2 fields`) {
		t.Errorf("bad cron: %+v", r)
	}
	if r := submit(t, s, "", "schedules", "frob"); r.code != 2 || !strings.Contains(r.stderr, `unknown verb "frob"`) {
		t.Errorf("bad verb: %+v", r)
	}
	submit(t, s, "", "schedules", "remove", "tick").want(t, 0, "removed tick\n")
	if r := submit(t, s, "", "schedules", "remove", "tick"); r.code != 1 || !strings.Contains(r.stderr, "no schedule tick in pool default") {
		t.Errorf("second remove: %+v", r)
	}
	submit(t, s, "", "schedules").want(t, 0, "NAME  CRON  FUNCTION  PAYLOAD  SINCE\n")
}

func TestJobDelay(t *testing.T) {
	s := mustServer(t)
	nc := mustConn(t, s)
	ctx := withTimeout(t, 30*time.Second)
	if err := bus.EnsureStreams(ctx, nc, "", zap.NewNop()); err != nil {
		t.Fatal(err)
	}
	submit(t, s, "", "job", "--delay", "1h", "--id", "later", "echo", `"x"`).want(t, 0, "later\n")
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	stream, err := js.Stream(ctx, "PYFLEET_JOBS")
	if err != nil {
		t.Fatal(err)
	}
	m, err := stream.GetLastMsgForSubject(ctx, protocol.Subjects{}.ScheduleAt("default", "later"))
	if err != nil {
		t.Fatal(err)
	}
	at, err := time.Parse(time.RFC3339, strings.TrimPrefix(m.Header.Get(protocol.HeaderSchedule), "@at "))
	if err != nil || at.Before(time.Now().Add(59*time.Minute)) || m.Header.Get(protocol.HeaderScheduleTarget) != "pyfleet.job.default.echo" ||
		m.Header.Get(protocol.HeaderJobID) != "later" || string(m.Data) != `"x"` {
		t.Errorf("schedule %v %s (%v)", m.Header, m.Data, err)
	}

	if r := submit(t, s, "", "job", "--at", "2000-01-01T00:00:00Z", "echo"); r.code != 1 || !strings.Contains(r.stderr, "is in the past") {
		t.Errorf("--at in the past: %+v", r)
	}
	if r := submit(t, s, "", "job", "--at", "tomorrow", "echo"); r.code != 2 || !strings.Contains(r.stderr, `--at "tomorrow": want an RFC 3339 time`) {
		t.Errorf("--at tomorrow: %+v", r)
	}
	if r := submit(t, s, "", "job", "--at", "2100-01-01T00:00:00Z", "--delay", "1s", "echo"); r.code != 2 || !strings.Contains(r.stderr, "not both") {
		t.Errorf("both: %+v", r)
	}
}
