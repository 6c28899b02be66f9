package client_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/pyfleet/pyfleet/client"
	"github.com/pyfleet/pyfleet/protocol"
)

// waitState polls the job's status until it is state.
func waitState(t *testing.T, j *client.Job, state string) *client.JobInfo {
	t.Helper()
	ctx := bounded(t, 60*time.Second)
	for {
		info, err := j.Info(ctx)
		if err == nil && info.State == state {
			return info
		}
		if ctx.Err() != nil {
			t.Fatalf("job %s never %s: last %+v, %v", j.ID, state, info, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestJobStatus: a job's status against real nodes, from the submitter's
// pending to the node's running and done, failed (400) and dead (its last
// delivery failed), with attempts, node, worker, timestamps and last error.
func TestJobStatus(t *testing.T) {
	c := connect(t, client.Options{})
	ctx := bounded(t, 60*time.Second)

	// No node serves this pool: the job stays as its submitter left it.
	idle := connect(t, client.Options{Pool: "status-idle"})
	job, err := idle.Submit(ctx, "echo", 1)
	if err != nil {
		t.Fatal(err)
	}
	info, err := job.Info(ctx)
	if err != nil || info.State != protocol.JobPending || info.Seq != job.Seq || info.Function != "echo" || info.Submitted.IsZero() || info.Attempts != 0 {
		t.Fatalf("pending job: %+v, %v", info, err)
	}
	if _, err := idle.Job("never-submitted").Status(ctx); !errors.Is(err, client.ErrNotFound) {
		t.Fatalf("status of an unknown job: %v, want ErrNotFound", err)
	}

	job, err = c.Submit(ctx, "block", map[string]int{"ms": 1500}, client.WithJobID(uniqueJobID("status-run")))
	if err != nil {
		t.Fatal(err)
	}
	info = waitState(t, job, protocol.JobRunning)
	if info.Node != mainNode.name || info.Attempts != 1 || info.Started.IsZero() {
		t.Fatalf("running job: %+v", info)
	}
	if err := job.Result(ctx, nil); err != nil {
		t.Fatal(err)
	}
	// The status is written right after the result is stored.
	info = waitState(t, job, protocol.JobDone)
	if info.Worker == "" || info.Finished.Before(info.Started) || info.Error != nil {
		t.Fatalf("done job: %+v", info)
	}
	if p, err := job.Progress(ctx); err != nil || p != nil {
		t.Fatalf("progress of a job that reported none: %s, %v", p, err)
	}

	job, err = c.Submit(ctx, "bad", nil)
	if err != nil {
		t.Fatal(err)
	}
	info = waitState(t, job, protocol.JobFailed)
	if info.Error == nil || info.Error.Code != 400 || info.Error.Message != "bad input" || info.Attempts != 1 {
		t.Fatalf("failed job: %+v", info)
	}
}

// TestJobStatusDead: a job that fails every delivery is retrying between
// them and dead after the last.
func TestJobStatusDead(t *testing.T) {
	startNode(t, "status-dead", "--max-deliver", "2")
	c := connect(t, client.Options{Pool: "status-dead"})
	ctx := bounded(t, 60*time.Second)
	job, err := c.Submit(ctx, "fail", nil)
	if err != nil {
		t.Fatal(err)
	}
	info := waitState(t, job, protocol.JobRetrying) // a second passes before the next delivery
	if info.Error == nil || info.Error.Type != "RuntimeError" || info.Attempts != 1 {
		t.Fatalf("retrying job: %+v", info)
	}
	info = waitState(t, job, protocol.JobDead)
	if info.Error == nil || info.Error.Type != "RuntimeError" || info.Attempts != 2 || info.Finished.IsZero() {
		t.Fatalf("dead job: %+v", info)
	}
}

// TestJobCancel: a pending job never runs, a running async job is
// cancelled, a running sync job's worker is replaced; Result then fails
// with ErrCancelled, and a job that has ended is not cancelled.
func TestJobCancel(t *testing.T) {
	ctx := bounded(t, 120*time.Second)

	// Pending: no node serves the pool yet.
	c := connect(t, client.Options{Pool: "cancel"})
	pending, err := c.Submit(ctx, "echo", "never", client.WithJobID(uniqueJobID("cancel-pending")))
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := pending.Cancel(ctx); !ok || err != nil {
		t.Fatalf("cancel of a pending job: %v, %v", ok, err)
	}
	n := startNode(t, "cancel")
	if err := pending.Result(ctx, nil); !errors.Is(err, client.ErrCancelled) {
		t.Fatalf("result of a cancelled pending job: %v, want ErrCancelled", err)
	}
	info, err := pending.Info(ctx)
	if err != nil || info.State != protocol.JobCancelled || info.Attempts != 0 || info.Error == nil || info.Error.Code != 499 {
		t.Fatalf("status of a cancelled pending job: %+v, %v", info, err)
	}
	// The result came from the status the cancel wrote; the node refuses
	// the job when it fetches it, which may be a moment later.
	waitFor(t, "the node to refuse the cancelled job", func() bool {
		return strings.Contains(n.logText(), "job cancelled before it ran")
	})

	// Running, async and sync: both a minute long, so only a cancel ends
	// them in time.
	for _, fn := range []string{"wait", "block"} {
		job, err := c.Submit(ctx, fn, map[string]int{"ms": 60_000})
		if err != nil {
			t.Fatal(err)
		}
		waitState(t, job, protocol.JobRunning)
		if ok, err := job.Cancel(ctx); !ok || err != nil {
			t.Fatalf("cancel of a running %s job: %v, %v", fn, ok, err)
		}
		rctx := bounded(t, 30*time.Second)
		if err := job.Result(rctx, nil); !errors.Is(err, client.ErrCancelled) {
			t.Fatalf("result of a cancelled running %s job: %v, want ErrCancelled", fn, err)
		}
		if s, err := job.Status(ctx); s != protocol.JobCancelled || err != nil {
			t.Fatalf("status of a cancelled %s job: %q, %v", fn, s, err)
		}
	}
	// The sync function could not be interrupted: its worker was replaced.
	// The async one's was not (one replacement in all).
	for end := time.Now().Add(30 * time.Second); strings.Count(n.logText(), "killing its worker") < 1; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("the sync job's worker was not replaced:\n%s", n.logText())
		}
	}
	if k := strings.Count(n.logText(), "killing its worker"); k != 1 {
		t.Fatalf("%d workers killed, want 1 (the sync job's):\n%s", k, n.logText())
	}
	// The pool works on.
	var out string
	if err := c.Call(ctx, "echo", "after", &out); err != nil || out != "after" {
		t.Fatalf("call after the cancels: %q, %v", out, err)
	}

	// A job that has ended stays as it ended.
	done, err := c.Submit(ctx, "echo", 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := done.Result(ctx, nil); err != nil {
		t.Fatal(err)
	}
	waitState(t, done, protocol.JobDone)
	if ok, err := done.Cancel(ctx); ok || err != nil {
		t.Fatalf("cancel of a done job: %v, %v; want false, nil", ok, err)
	}
	if _, err := c.Job("never-submitted").Cancel(ctx); !errors.Is(err, client.ErrNotFound) {
		t.Fatalf("cancel of an unknown job: %v, want ErrNotFound", err)
	}
}
