package client_test

import (
	"context"
	"errors"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/pyfleet/pyfleet/client"
	"github.com/pyfleet/pyfleet/protocol"
)

func TestSubmitDelayed(t *testing.T) {
	c := connect(t, client.Options{})
	ctx := bounded(t, 60*time.Second)

	before := time.Now()
	job, err := c.Submit(ctx, "echo", "later", client.WithDelay(2*time.Second), client.WithAwait())
	if err != nil {
		t.Fatal(err)
	}
	if job.At.Before(before.Add(2*time.Second)) || job.Seq == 0 {
		t.Fatalf("job %+v", job)
	}
	// The status was written at submission; the job cannot have fired yet
	// unless the machine stalled for the whole delay.
	if st, err := job.Status(ctx); err != nil || (st != protocol.JobScheduled && time.Now().Before(job.At)) {
		t.Fatalf("status %q, %v", st, err)
	}
	var out string
	if err := job.Result(ctx, &out); err != nil || out != "later" {
		t.Fatalf("result %q, %v", out, err)
	}
	// The node stores the result before it writes "done".
	info, err := job.Info(ctx)
	for err == nil && info.State != protocol.JobDone && ctx.Err() == nil {
		time.Sleep(50 * time.Millisecond)
		info, err = job.Info(ctx)
	}
	if err != nil {
		t.Fatal(err)
	}
	// The server fires at the due second (RFC 3339 of the schedule).
	if info.State != protocol.JobDone || info.Started.Before(job.At.Truncate(time.Second)) || info.Attempts != 1 {
		t.Errorf("info %+v, due %v", info, job.At)
	}
}

func TestCancelScheduled(t *testing.T) {
	c := connect(t, client.Options{})
	ctx := bounded(t, 60*time.Second)

	job, err := c.Submit(ctx, "echo", "never", client.WithDelay(time.Hour), client.WithAwait())
	if err != nil {
		t.Fatal(err)
	}
	ok, err := job.Cancel(ctx)
	if err != nil || !ok {
		t.Fatalf("cancel: %v, %v", ok, err)
	}
	// Cancel makes the schedule fire at once so that a node settles it:
	// the result says cancelled long before the hour.
	var out string
	if err := job.Result(ctx, &out); !errors.Is(err, client.ErrCancelled) {
		t.Fatalf("result %q, %v: want ErrCancelled", out, err)
	}
	info, err := job.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State != protocol.JobCancelled || !info.Started.IsZero() || info.Worker != "" {
		t.Errorf("a cancelled scheduled job ran: %+v", info)
	}
	if ok, err := job.Cancel(ctx); err != nil || ok {
		t.Errorf("second cancel: %v, %v", ok, err)
	}
}

func TestScheduleCron(t *testing.T) {
	c := connect(t, client.Options{})
	ctx := bounded(t, 90*time.Second)

	// Each firing's result is forwarded here, which shows each job's id.
	results, err := c.Conn().SubscribeSync("cron-test.tick")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = results.Unsubscribe() }()
	// Every second: the server's cron has a seconds field, which keeps
	// this test short.
	s, err := c.Schedule(ctx, "tick", "* * * * * *", "echo", map[string]string{"from": "cron"}, client.WithReplyTo("cron-test.tick"))
	if err != nil {
		t.Fatal(err)
	}
	if s.Pattern != "* * * * * *" || s.Function != "echo" {
		t.Errorf("schedule %+v", s)
	}
	list, err := c.Schedules(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || list[0].Name != "tick" || list[0].Cron != "* * * * * *" || list[0].Function != "echo" ||
		string(list[0].Payload) != `{"from":"cron"}` {
		t.Fatalf("schedules %+v", list)
	}

	ids := map[string]bool{}
	idRE := regexp.MustCompile(`^tick-[0-9]+$`)
	for len(ids) < 3 {
		m, err := results.NextMsg(time.Until(deadlineOf(ctx)))
		if err != nil {
			t.Fatalf("%d firings seen (%v): %v", len(ids), ids, err)
		}
		id := m.Header.Get(protocol.HeaderJobID)
		if !idRE.MatchString(id) || string(m.Data) != `{"from":"cron"}` {
			t.Fatalf("firing %q: %s", id, m.Data)
		}
		ids[id] = true
	}

	if ok, err := c.Unschedule(ctx, "tick"); err != nil || !ok {
		t.Fatalf("unschedule: %v, %v", ok, err)
	}
	if ok, err := c.Unschedule(ctx, "tick"); err != nil || ok {
		t.Errorf("second unschedule: %v, %v", ok, err)
	}
	if list, err := c.Schedules(ctx); err != nil || len(list) != 0 {
		t.Errorf("schedules after unschedule: %+v, %v", list, err)
	}
	// Nothing fires any more: no job is stored in the jobs stream for 3
	// firing periods. A firing the server had taken up as the schedule was
	// removed is given a second to be stored first.
	time.Sleep(time.Second)
	js, err := jetstream.New(c.Conn())
	if err != nil {
		t.Fatal(err)
	}
	stream, err := js.Stream(ctx, "PYFLEET_JOBS")
	if err != nil {
		t.Fatal(err)
	}
	last := stream.CachedInfo().State.LastSeq
	time.Sleep(3 * time.Second)
	info, err := stream.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State.LastSeq != last {
		t.Errorf("the jobs stream grew from %d to %d after unschedule", last, info.State.LastSeq)
	}
}

func deadlineOf(ctx context.Context) time.Time {
	d, _ := ctx.Deadline()
	return d
}

func TestScheduleBadInput(t *testing.T) {
	c := connect(t, client.Options{})
	ctx := bounded(t, 30*time.Second)

	for _, tc := range []struct {
		name string
		err  func() error
		want string
	}{
		{"at in the past", func() error {
			_, err := c.Submit(ctx, "echo", 1, client.WithAt(time.Now().Add(-time.Minute)))
			return err
		}, "is in the past"},
		{"negative delay", func() error {
			_, err := c.Submit(ctx, "echo", 1, client.WithDelay(-time.Second))
			return err
		}, "want a positive duration"},
		{"both", func() error {
			_, err := c.Submit(ctx, "echo", 1, client.WithDelay(time.Second), client.WithAt(time.Now().Add(time.Hour)))
			return err
		}, "not both"},
		{"cron fields", func() error {
			_, err := c.Schedule(ctx, "bad", "* * *", "echo", nil)
			return err
		}, `cron "* * *": 3 fields`},
		{"cron value", func() error {
			_, err := c.Schedule(ctx, "bad", "61 * * * *", "echo", nil)
			return err
		}, `cron "61 * * * *" (0 61 * * * *): the NATS server refuses the pattern`},
		{"every too short", func() error {
			_, err := c.Schedule(ctx, "bad", "@every 10ms", "echo", nil)
			return err
		}, "at least 1s"},
		{"name", func() error {
			_, err := c.Schedule(ctx, "a.b", "@hourly", "echo", nil)
			return err
		}, "schedule name"},
	} {
		err := tc.err()
		var ce *client.Error
		if !errors.As(err, &ce) || ce.Code != 400 || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want a 400 containing %q", tc.name, err, tc.want)
		}
	}
	if list, err := c.Schedules(ctx); err != nil || len(list) != 0 {
		t.Errorf("a refused schedule is listed: %+v, %v", list, err)
	}
}

// A subject of the schedules tree is no place for a result.
func TestScheduleReplyToRefused(t *testing.T) {
	c := connect(t, client.Options{})
	ctx := bounded(t, 30*time.Second)
	job, err := c.Submit(ctx, "echo", 1, client.WithReplyTo("pyfleet.sched.default.cron.x"), client.WithAwait())
	if err != nil {
		t.Fatal(err)
	}
	var out any
	var ce *client.Error
	if err := job.Result(ctx, &out); !errors.As(err, &ce) || ce.Code != 400 || !strings.Contains(ce.Message, "pyfleet.sched") {
		t.Errorf("result %v, %v", out, err)
	}
}
