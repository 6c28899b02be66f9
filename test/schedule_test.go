package test

import (
	"context"
	"syscall"
	"testing"
	"time"

	"github.com/pyfleet/pyfleet/client"
	"github.com/pyfleet/pyfleet/protocol"
)

// A delayed job and a recurring schedule live in the jobs stream, not in a
// node: the job fires after every node was stopped and a new one started
// on the same state dir (the embedded server's JetStream store), and the
// schedule is still there.
func TestScheduleSurvivesEveryNode(t *testing.T) {
	dir := shortTempDir(t)
	first := startNode(t, nodeOptions{stateDir: dir})
	c, err := client.Connect(first.url, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	job, err := c.Submit(ctx, "echo", "after the restart", client.WithDelay(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Schedule(ctx, "nightly", "0 3 * * *", "echo", "n"); err != nil {
		t.Fatal(err)
	}
	c.Close()

	first.signal(syscall.SIGTERM)
	if code := first.wait(60 * time.Second); code != 0 {
		t.Fatalf("first node exit code %d\n%s", code, first.log())
	}
	// No node, no server: the job falls due meanwhile.
	time.Sleep(time.Until(job.At) + time.Second)

	second := startNode(t, nodeOptions{stateDir: dir})
	c2, err := client.Connect(second.url, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	var out string
	if err := c2.Job(job.ID).Result(ctx, &out); err != nil || out != "after the restart" {
		t.Fatalf("result %q, %v", out, err)
	}
	info, err := c2.Job(job.ID).Info(ctx)
	for err == nil && info.State != protocol.JobDone && ctx.Err() == nil {
		time.Sleep(50 * time.Millisecond)
		info, err = c2.Job(job.ID).Info(ctx)
	}
	if err != nil || info.Node != second.name || info.Attempts != 1 {
		t.Errorf("info %+v, %v", info, err)
	}
	list, err := c2.Schedules(ctx)
	if err != nil || len(list) != 1 || list[0].Name != "nightly" || list[0].Pattern != "0 0 3 * * *" {
		t.Errorf("schedules after the restart: %+v, %v", list, err)
	}
}
