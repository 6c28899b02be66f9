package bus_test

import (
	"context"
	"encoding/json"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/pyfleet/pyfleet/bus"
	"github.com/pyfleet/pyfleet/protocol"
)

// readStatus reads job id's status in pool p, or nil when there is none.
func readStatus(t *testing.T, kv jetstream.KeyValue, id string) *protocol.JobStatus {
	t.Helper()
	e, err := kv.Get(context.Background(), protocol.StatusKey("p", id))
	if err != nil {
		return nil
	}
	var st protocol.JobStatus
	if err := json.Unmarshal(e.Value(), &st); err != nil {
		t.Fatalf("status of %s: %v: %s", id, err, e.Value())
	}
	return &st
}

func waitStatus(t *testing.T, kv jetstream.KeyValue, id, state string) *protocol.JobStatus {
	t.Helper()
	var st *protocol.JobStatus
	eventually(t, "job "+id+" "+state, func() bool {
		st = readStatus(t, kv, id)
		return st != nil && st.State == state
	})
	return st
}

// TestJobStatusAndProgressHook: the node keeps each job's status in the
// bucket, kept as long as results, and Jobs.Progress (the hook a
// function's progress reports go through) records the last value of a job
// running here, and nothing for one that is not.
func TestJobStatusAndProgressHook(t *testing.T) {
	nc, js := jobsSetup(t)
	h := &jobHandler{}
	j := MustJobs(t, nc, h, func(c *bus.JobsConfig) { c.MaxDeliver = 2; c.BackOff = []time.Duration{100 * time.Millisecond} })
	ctx := context.Background()
	kv, err := js.KeyValue(ctx, protocol.StatusBucket(""))
	if err != nil {
		t.Fatal(err)
	}
	kvs, err := kv.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if kvs.TTL() != 24*time.Hour || kvs.Bucket() != "PYFLEET_STATUS" {
		t.Fatalf("bucket %s keeps keys %v; want PYFLEET_STATUS, 24h as the results", kvs.Bucket(), kvs.TTL())
	}

	ack := submit(t, js, "sleep", "s:1", "1500")
	st := waitStatus(t, kv, "s:1", protocol.JobRunning)
	if st.Attempts != 1 || st.Node != "n1" || st.Function != "sleep" || st.Seq != ack.Sequence || st.Submitted.IsZero() || st.Started.IsZero() {
		t.Fatalf("running status %+v", st)
	}
	if j.Progress("nope", json.RawMessage(`1`)) {
		t.Fatal("progress of a job not running here was recorded")
	}
	if !j.Progress("s:1", json.RawMessage(`{"done":1,"total":3}`)) {
		t.Fatal("progress of a running job was not recorded")
	}
	if st = readStatus(t, kv, "s:1"); string(st.Progress) != `{"done":1,"total":3}` || st.State != protocol.JobRunning {
		t.Fatalf("status after progress %+v", st)
	}
	st = waitStatus(t, kv, "s:1", protocol.JobDone)
	if st.Worker != "w1" || st.Finished.IsZero() || st.Error != nil || string(st.Progress) != `{"done":1,"total":3}` {
		t.Fatalf("done status %+v", st)
	}
	if j.Progress("s:1", json.RawMessage(`2`)) {
		t.Fatal("progress after the end was recorded")
	}

	submit(t, js, "bad", "b1", "1")
	st = waitStatus(t, kv, "b1", protocol.JobFailed)
	if st.Error == nil || st.Error.Code != 400 || st.Attempts != 1 || st.Finished.IsZero() {
		t.Fatalf("failed status %+v", st)
	}

	// Every state the node writes, the short-lived "retrying" too, in
	// order. Not through a watcher: the bucket keeps one value a key, and
	// a write the server replaces before its watcher's consumer delivered
	// it is never delivered (a watcher of this test once saw [running
	// retrying dead]: the second "running" was overwritten within a
	// millisecond). A subscription to the key's subject gets every
	// message published to it; the node is f1's only writer here, so none
	// of them is a compare-and-set the stream refused.
	writes, err := nc.SubscribeSync("$KV." + protocol.StatusBucket("") + "." + protocol.StatusKey("p", "f1"))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = writes.Unsubscribe() }()
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	submit(t, js, "fail", "f1", "1")
	st = waitStatus(t, kv, "f1", protocol.JobDead)
	var states []string
	for len(states) == 0 || states[len(states)-1] != protocol.JobDead {
		m, err := writes.NextMsg(10 * time.Second)
		if err != nil {
			t.Fatalf("states written %v, and no more: %v", states, err)
		}
		var s protocol.JobStatus
		if err := json.Unmarshal(m.Data, &s); err != nil {
			t.Fatal(err)
		}
		states = append(states, s.State)
	}
	if want := []string{protocol.JobRunning, protocol.JobRetrying, protocol.JobRunning, protocol.JobDead}; !slices.Equal(states, want) {
		t.Fatalf("states %v, want %v", states, want)
	}
	if st.Error == nil || st.Error.Type != "ValueError" || st.Error.Message != "always 2" || st.Attempts != 2 {
		t.Fatalf("dead status %+v", st)
	}
}

// TestCancelMessageAloneCancelsNothing: a cancel message for a job whose
// status does not say cancelled (anyone who may publish could send one) is
// ignored; with the status, the running job is stopped and its result is
// 499 Cancelled, with no dead letter.
func TestCancelMessageAloneCancelsNothing(t *testing.T) {
	nc, js := jobsSetup(t)
	h := &jobHandler{}
	MustJobs(t, nc, h)
	ctx := context.Background()
	kv, err := js.KeyValue(ctx, protocol.StatusBucket(""))
	if err != nil {
		t.Fatal(err)
	}
	submit(t, js, "sleep", "c1", "1500")
	waitStatus(t, kv, "c1", protocol.JobRunning)
	if err := nc.Publish("pyfleet.cancel.job.p.c1", nil); err != nil {
		t.Fatal(err)
	}
	if st := waitStatus(t, kv, "c1", protocol.JobDone); st.Error != nil {
		t.Fatalf("status %+v", st)
	}

	submit(t, js, "sleep", "c2", "60000")
	st := waitStatus(t, kv, "c2", protocol.JobRunning)
	e, err := kv.Get(ctx, protocol.StatusKey("p", "c2"))
	if err != nil {
		t.Fatal(err)
	}
	st.State = protocol.JobCancelled
	b, _ := json.Marshal(st)
	if _, err := kv.Update(ctx, protocol.StatusKey("p", "c2"), b, e.Revision()); err != nil {
		t.Fatal(err)
	}
	if err := nc.Publish("pyfleet.cancel.job.p.c2", nil); err != nil {
		t.Fatal(err)
	}
	res := waitStored(t, js, "c2")
	if ce := protocol.ReplyError(res.Header, res.Data); ce == nil || ce.Code != 499 || ce.Type != "Cancelled" {
		t.Fatalf("result of the cancelled job: %v %s", res.Header, res.Data)
	}
	if n := streamMsgs(t, js, "PYFLEET_DEAD"); n != 0 {
		t.Fatalf("%d dead letters, want none", n)
	}
	eventually(t, "the job left the stream", func() bool { return streamMsgs(t, js, "PYFLEET_JOBS") == 0 })
}
