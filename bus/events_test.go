package bus_test

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/pyfleet/pyfleet/bus"
	"github.com/pyfleet/pyfleet/lifecycle"
)

func TestEvents(t *testing.T) {
	srv := MustServer(t)
	nc := MustConn(t, srv)
	sub, err := nc.SubscribeSync("pyfleet.evt.>")
	if err != nil {
		t.Fatal(err)
	}
	// The events come over another connection: the server must have the
	// subscription first.
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	p := bus.NewEventPublisher(MustConn(t, srv), "", "p", "n1", nil)
	var events lifecycle.Events = p.Publish
	code := 0
	before := time.Now()
	events(lifecycle.Event{Kind: lifecycle.KindCrashed, Worker: "w3", PID: 42, ExitCode: &code})
	events(lifecycle.Event{Kind: lifecycle.KindOrphanReaped, Node: "old", Run: "r1", TS: time.Date(2030, 1, 2, 3, 4, 5, 6, time.FixedZone("x", 3600))})
	events(lifecycle.Event{Kind: "bad.kind"}) // logged, not published

	m, err := sub.NextMsg(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if m.Subject != "pyfleet.evt.p.n1.crashed" {
		t.Errorf("subject = %s", m.Subject)
	}
	var raw map[string]any
	if err := json.Unmarshal(m.Data, &raw); err != nil {
		t.Fatal(err)
	}
	for k, want := range map[string]any{"kind": "crashed", "pool": "p", "node": "n1", "worker": "w3", "pid": 42.0, "exit_code": 0.0} {
		if raw[k] != want {
			t.Errorf("%s = %v, want %v", k, raw[k], want)
		}
	}
	for _, absent := range []string{"run", "pgid", "reason", "signal", "detail"} {
		if _, ok := raw[absent]; ok {
			t.Errorf("empty field %s present in %s", absent, m.Data)
		}
	}
	ts, err := time.Parse(time.RFC3339Nano, raw["ts"].(string))
	if err != nil || ts.Before(before.Add(-time.Second)) || ts.Location() != time.UTC {
		t.Errorf("ts = %v (%v)", raw["ts"], err)
	}

	m, err = sub.NextMsg(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var ev lifecycle.Event
	if err := json.Unmarshal(m.Data, &ev); err != nil {
		t.Fatal(err)
	}
	if m.Subject != "pyfleet.evt.p.old.orphan_reaped" || ev.Node != "old" || ev.Run != "r1" {
		t.Errorf("%s %+v", m.Subject, ev)
	}
	if want := "2030-01-02T02:04:05.000000006Z"; ev.TS.Format(time.RFC3339Nano) != want {
		t.Errorf("ts = %s, want %s", ev.TS.Format(time.RFC3339Nano), want)
	}
	if m, err := sub.NextMsg(100 * time.Millisecond); err == nil {
		t.Errorf("unexpected event %s", m.Subject)
	}
}
