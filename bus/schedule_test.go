package bus_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap/zaptest"

	"github.com/pyfleet/pyfleet/bus"
	"github.com/pyfleet/pyfleet/protocol"
)

// A jobs stream made by a node from before schedules gets them enabled in
// place, keeping what an operator tuned, and a schedule in it then fires.
func TestEnsureStreamsEnablesSchedules(t *testing.T) {
	srv := MustServer(t)
	nc := MustConn(t, srv)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	old := jetstream.StreamConfig{
		Name: "PYFLEET_JOBS", Subjects: []string{"pyfleet.job.>"}, Retention: jetstream.WorkQueuePolicy,
		Storage: jetstream.FileStorage, Duplicates: 2 * time.Minute, MaxMsgs: 12345, // the operator's
	}
	if _, err := js.CreateStream(ctx, old); err != nil {
		t.Fatal(err)
	}
	if err := bus.EnsureStreams(ctx, nc, "", zaptest.NewLogger(t)); err != nil {
		t.Fatal(err)
	}
	s, err := js.Stream(ctx, "PYFLEET_JOBS")
	if err != nil {
		t.Fatal(err)
	}
	cfg := s.CachedInfo().Config
	if !cfg.AllowMsgSchedules || !slices.Equal(cfg.Subjects, []string{"pyfleet.job.>", "pyfleet.sched.>"}) || cfg.MaxMsgs != 12345 ||
		cfg.Retention != jetstream.WorkQueuePolicy {
		t.Fatalf("stream after EnsureStreams: %+v", cfg)
	}

	target := protocol.Subjects{}.Job("p", "f")
	m := nats.NewMsg(protocol.Subjects{}.ScheduleAt("p", "j1"))
	m.Header.Set(protocol.HeaderSchedule, "@at "+time.Now().UTC().Format(time.RFC3339))
	m.Header.Set(protocol.HeaderScheduleTarget, target)
	m.Header.Set(protocol.HeaderJobID, "j1")
	m.Header.Set(protocol.HeaderMsgID, "j1")
	m.Data = []byte(`"x"`)
	if _, err := js.PublishMsg(ctx, m); err != nil {
		t.Fatal(err)
	}
	// The server stores the firing in the stream itself (no core
	// publish): wait for it there.
	var fired *jetstream.RawStreamMsg
	for fired == nil {
		fired, err = s.GetLastMsgForSubject(ctx, target)
		if ctx.Err() != nil {
			t.Fatalf("the schedule did not fire: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// What the node reads a fired job's identity from (bus/schedule.go).
	if fired.Header.Get(protocol.HeaderJobID) != "j1" || fired.Header.Get(protocol.HeaderMsgID) != "" ||
		fired.Header.Get(protocol.HeaderScheduler) != m.Subject || string(fired.Data) != `"x"` {
		t.Errorf("fired %v %s", fired.Header, fired.Data)
	}

	// Enabling is done once; a second node changes nothing.
	if err := bus.EnsureStreams(ctx, nc, "", zaptest.NewLogger(t)); err != nil {
		t.Fatal(err)
	}
}
