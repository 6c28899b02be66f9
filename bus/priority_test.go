package bus_test

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pyfleet/pyfleet/bus"
	"github.com/pyfleet/pyfleet/protocol"
)

// TestJobPriorityConsumers: a node takes over the consumer an older node
// left (filtering the whole pool, which would overlap the priority levels'
// consumers) and runs jobs of each level, storing their results under the
// function's name; a subject with more tokens than a job has is still
// dead-lettered as naming no function, not left in the stream.
func TestJobPriorityConsumers(t *testing.T) {
	nc, js := jobsSetup(t)
	ctx := context.Background()
	if err := bus.EnsureStreams(ctx, nc, "", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := js.CreateConsumer(ctx, "PYFLEET_JOBS", jetstream.ConsumerConfig{
		Durable: "pyfleet_p", FilterSubject: "pyfleet.job.p.>", AckPolicy: jetstream.AckExplicitPolicy,
	}); err != nil {
		t.Fatal(err)
	}
	h := &jobHandler{}
	MustJobs(t, nc, h)
	for _, name := range []string{"pyfleet_p", "pyfleet_p~high", "pyfleet_p~low"} {
		c, err := js.Consumer(ctx, "PYFLEET_JOBS", name)
		if err != nil {
			t.Fatalf("consumer %s: %v", name, err)
		}
		t.Logf("%s filters %v", name, c.CachedInfo().Config.FilterSubjects)
	}

	for _, p := range protocol.Priorities {
		id := "prio-" + p
		submitTo(t, js, protocol.Subjects{}.JobPriority("p", "echo", p), id, `"`+p+`"`)
		m := waitStored(t, js, id)
		if string(m.Data) != `"`+p+`"` || m.Header.Get(protocol.HeaderFunction) != "echo" {
			t.Errorf("%s job: stored %s %v", p, m.Data, m.Header)
		}
	}

	// A pool whose name ends as the level's consumer would: its
	// consumers are its own, and both pools run their jobs.
	other := &jobHandler{}
	MustJobs(t, nc, other, func(c *bus.JobsConfig) { c.Pool = "p_high" })
	submitTo(t, js, "pyfleet.job.p_high.echo", "other-pool", `2`)
	submitTo(t, js, "pyfleet.job.p.echo.high", "still-p", `3`)
	eventually(t, "both pools ran their jobs", func() bool { return other.runsOf("other-pool") == 1 && h.runsOf("still-p") == 1 })

	dead := mustSub(t, nc, "pyfleet.dead.>")
	submitTo(t, js, "pyfleet.job.p.echo.x.y", "too-long", `1`)
	m := next(t, dead, 10*time.Second)
	if m.Header.Get(protocol.HeaderErrorCode) != "404" || m.Header.Get(protocol.HeaderJobID) != "too-long" {
		t.Errorf("dead letter %s %v", m.Data, m.Header)
	}
}

func submitTo(t *testing.T, js jetstream.JetStream, subject, id, body string) {
	t.Helper()
	m := nats.NewMsg(subject)
	m.Data = []byte(body)
	m.Header.Set(protocol.HeaderMsgID, id)
	if _, err := js.PublishMsg(context.Background(), m); err != nil {
		t.Fatalf("submit to %s: %v", subject, err)
	}
}
