package client_test

import (
	"errors"
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

	job, err = c.Submit(ctx, "block", map[string]int{"ms": 1500}, client.WithJobID("status-run"))
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
