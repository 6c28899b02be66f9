package test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pyfleet/pyfleet/bus"
	"github.com/pyfleet/pyfleet/protocol"
)

// jobsApp is the Python app of the jobs, cluster and session tests.
func jobsApp() string { return filepath.Join(repoRoot, "test", "apps", "jobs.py") }

// TestJobRetriesDeadLetterAndLease runs one node against a real nats-server
// with --max-deliver 4 and the node's real AckWait (bus.DefaultAckWait, 30 s:
// poolnode has no flag for it) and redelivery backoff (the default of bus.JobsConfig.BackOff:
// 1 s, 10 s, 60 s, ...), so it takes about 75 s, spent waiting. It runs in
// parallel with the busy tests.
//   - a job that fails three times, then succeeds, is stored ok after its
//     fourth delivery, the last one the limit allows;
//   - a job that always fails is in PYFLEET_DEAD after four deliveries,
//     with its last error, and its stored result is that error;
//   - a job that runs longer than AckWait runs once: InProgress keeps its
//     lease while its node lives;
//   - a job id submitted twice is queued and run once (Nats-Msg-Id).
func TestJobRetriesDeadLetterAndLease(t *testing.T) {
	t.Parallel() // mostly waiting for backoff: overlaps the busy tests
	srv := startNATSJetStream(t, "jobs")
	url := srv.url()
	startNode(t, nodeOptions{workers: 3, app: jobsApp(), extra: []string{"--nats", url, "--max-deliver", "4"}})
	nc := connectNATS(t, url)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	payload := func(v map[string]any) string {
		v["dir"] = dir
		b, _ := json.Marshal(v)
		return string(b)
	}
	longFor := bus.DefaultAckWait + 10*time.Second
	start := time.Now()

	// The flaky job through `submit job --wait`, which must sit through
	// all three failures and print the success.
	type result struct {
		out, errOut string
		code        int
	}
	flakyDone := make(chan result, 1)
	go func() {
		out, errOut, code := runSubmitNoFatal(url, "job", "--id", "flaky-1", "--wait", "--timeout", "4m",
			"flaky", payload(map[string]any{"key": "k1"}))
		flakyDone <- result{out, errOut, code}
	}()
	// The failing one too: --wait must end with the dead letter's error.
	failsDone := make(chan result, 1)
	go func() {
		out, errOut, code := runSubmitNoFatal(url, "job", "--id", "fails-1", "--wait", "--timeout", "4m",
			"always_fails", payload(map[string]any{"key": "f1"}))
		failsDone <- result{out, errOut, code}
	}()
	for _, args := range [][]string{
		{"--id", "long-1", "long", payload(map[string]any{"key": "l1", "seconds": longFor.Seconds()})},
		{"--id", "dup-1", "work", payload(map[string]any{"id": "dup-1"})},
	} {
		out, errOut, code := runSubmit(t, url, "", append([]string{"job"}, args...)...)
		if code != 0 || strings.TrimSpace(out) != args[1] {
			t.Fatalf("submit job %v: exit %d, stdout %q, stderr %q", args, code, out, errOut)
		}
	}
	t.Run("a duplicate id is not queued again", func(t *testing.T) {
		out, errOut, code := runSubmit(t, url, "", "job", "--id", "dup-1", "work", payload(map[string]any{"id": "dup-1"}))
		if code != 0 || strings.TrimSpace(out) != "dup-1" || !strings.Contains(errOut, "already submitted") {
			t.Errorf("second submit of dup-1: exit %d, stdout %q, stderr %q", code, out, errOut)
		}
		res := waitJobResult(t, js, "default", "dup-1", time.Minute)
		if st := res.Header.Get(protocol.HeaderStatus); st != protocol.StatusOK {
			t.Errorf("dup-1 result status %q: %s", st, res.Data)
		}
		if runs := countLines(t, filepath.Join(dir), "dup-1"); runs != 1 {
			t.Errorf("dup-1 ran %d times, want 1", runs)
		}
	})

	t.Run("a job longer than AckWait runs once", func(t *testing.T) {
		res := waitJobResult(t, js, "default", "long-1", longFor+time.Minute)
		if st := res.Header.Get(protocol.HeaderStatus); st != protocol.StatusOK {
			t.Fatalf("long-1 status %q: %s", st, res.Data)
		}
		starts := readLines(t, filepath.Join(dir, "long-l1"))
		if len(starts) != 1 {
			t.Errorf("long-1 (%s, AckWait %s) started %d times, want once: %q", longFor, bus.DefaultAckWait, len(starts), starts)
		}
		t.Logf("long-1 (%s) done after %s, started %d time(s)", longFor, time.Since(start).Round(time.Millisecond), len(starts))
	})

	t.Run("fails three times then succeeds", func(t *testing.T) {
		var r result
		select {
		case r = <-flakyDone:
		case <-time.After(4 * time.Minute):
			t.Fatal("submit job --wait flaky did not return in 4 min")
		}
		if r.code != 0 || strings.TrimSpace(r.out) != `{"key":"k1","attempt":4}` {
			t.Fatalf("submit job --wait flaky: exit %d, stdout %q, stderr %q", r.code, r.out, r.errOut)
		}
		runs := readLines(t, filepath.Join(dir, "flaky-k1"))
		if len(runs) != 4 {
			t.Errorf("flaky ran %d times, want 4: %q", len(runs), runs)
		}
		res := waitJobResult(t, js, "default", "flaky-1", time.Second)
		if st := res.Header.Get(protocol.HeaderStatus); st != protocol.StatusOK {
			t.Errorf("stored flaky-1 result status %q: %s", st, res.Data)
		}
		t.Logf("flaky-1 stored ok %s after submission; runs (attempt worker unix-time): %q", time.Since(start).Round(time.Millisecond), runs)
	})

	t.Run("always failing lands in PYFLEET_DEAD after --max-deliver", func(t *testing.T) {
		dead := waitDeadLetter(t, js, "default", "fails-1", 2*time.Minute)
		var body protocol.DeadLetter
		if err := json.Unmarshal(dead.Data, &body); err != nil {
			t.Fatalf("dead letter body %q: %v", dead.Data, err)
		}
		if body.Job.Deliveries != 4 || body.Error.Code != 500 || body.Error.Type != "RuntimeError" ||
			body.Error.Message != "always fails: f1" || body.Job.ID != "fails-1" || body.Job.Subject != "pyfleet.job.default.always_fails" {
			t.Errorf("dead letter %s", dead.Data)
		}
		if got := dead.Header.Get(protocol.HeaderErrorCode); got != "500" {
			t.Errorf("dead letter %s header %q", protocol.HeaderErrorCode, got)
		}
		if runs := readLines(t, filepath.Join(dir, "fails-f1")); len(runs) != 4 {
			t.Errorf("always_fails ran %d times, want 4 (--max-deliver 4)", len(runs))
		}
		res := waitJobResult(t, js, "default", "fails-1", 10*time.Second)
		if res.Header.Get(protocol.HeaderStatus) != protocol.StatusError || !strings.Contains(string(res.Data), "always fails: f1") {
			t.Errorf("stored result of fails-1: %v %s", res.Header, res.Data)
		}
		// `submit job --wait` ends with the error once the job is dead.
		var r result
		select {
		case r = <-failsDone:
		case <-time.After(time.Minute):
			t.Fatal("submit job --wait always_fails did not return after the dead letter")
		}
		if r.code != 1 || !strings.Contains(r.errOut, "500 RuntimeError: always fails: f1") {
			t.Errorf("submit job --wait fails-1: exit %d, stdout %q, stderr %q; want exit 1 and the error", r.code, r.out, r.errOut)
		}
		t.Logf("fails-1 dead-lettered %s after submission", time.Since(start).Round(time.Millisecond))
	})

	if n := streamInfo(t, js, "PYFLEET_JOBS").State.Msgs; n != 0 {
		t.Errorf("%d jobs left in PYFLEET_JOBS, want 0", n)
	}
}

// TestJobsThroughput measures jobs per second through JetStream: 2,000
// `work` jobs (no sleep) published to one real nats-server, timed from the
// first publish until every result is stored, with one node and with three
// (two workers each). The figures are logged, not asserted.
func TestJobsThroughput(t *testing.T) {
	const n = 2000
	for _, nodes := range []int{1, 3} {
		t.Run(fmt.Sprintf("%d nodes", nodes), func(t *testing.T) {
			srv := startNATSJetStream(t, fmt.Sprintf("tp%d", nodes))
			for range nodes {
				startNode(t, nodeOptions{workers: 2, app: jobsApp(), extra: []string{"--nats", srv.url()}})
			}
			nc := connectNATS(t, srv.url())
			js, err := jetstream.New(nc)
			if err != nil {
				t.Fatal(err)
			}
			jobs := make([]jobSpec, n)
			for i := range jobs {
				id := fmt.Sprintf("tp-%d", i)
				jobs[i] = jobSpec{id: id, subject: "pyfleet.job.default.work", data: []byte(`{"id":"` + id + `"}`)}
			}
			start := time.Now()
			publishJobs(t, js, jobs)
			published := time.Since(start)
			waitStreamMsgs(t, js, "PYFLEET_RESULTS", n, 3*time.Minute, nil)
			took := time.Since(start)
			t.Logf("JOBS/S %d nodes x 2 workers: %d jobs in %s = %.0f jobs/s (publishing took %s; -race binaries, %d CPUs)",
				nodes, n, took.Round(time.Millisecond), float64(n)/took.Seconds(), published.Round(time.Millisecond), runtime.NumCPU())
			results := readStream(t, js, "PYFLEET_RESULTS", n)
			for _, m := range results {
				if m.Headers().Get(protocol.HeaderStatus) != protocol.StatusOK {
					t.Errorf("result %s: %v %s", m.Subject(), m.Headers(), m.Data())
				}
			}
		})
	}
}

// jobSpec is one job to publish: Nats-Msg-Id id on subject.
type jobSpec struct {
	id, subject string
	data        []byte
}

// publishJobs publishes jobs with their Nats-Msg-Id, many in flight at a
// time, and makes sure the stream stored each one: a publish that failed
// (a server died, a leader moved) is sent again with the same id, which
// the stream's duplicate window makes harmless.
func publishJobs(t *testing.T, js jetstream.JetStream, jobs []jobSpec) {
	t.Helper()
	const window = 512
	msg := func(j jobSpec) *nats.Msg {
		m := nats.NewMsg(j.subject)
		m.Header.Set(jetstream.MsgIDHeader, j.id)
		m.Data = j.data
		return m
	}
	var retry []jobSpec
	for lo := 0; lo < len(jobs); lo += window {
		batch := jobs[lo:min(lo+window, len(jobs))]
		futures := make([]jetstream.PubAckFuture, len(batch))
		for i, j := range batch {
			f, err := js.PublishMsgAsync(msg(j))
			if err != nil {
				retry = append(retry, j)
				continue
			}
			futures[i] = f
		}
		for i, f := range futures {
			if f == nil {
				continue
			}
			select {
			case <-f.Ok():
			case <-f.Err():
				retry = append(retry, batch[i])
			case <-time.After(30 * time.Second):
				retry = append(retry, batch[i])
			}
		}
	}
	for _, j := range retry {
		deadline := time.Now().Add(time.Minute)
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_, err := js.PublishMsg(ctx, msg(j))
			cancel()
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("publish job %s: %v", j.id, err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	if len(retry) > 0 {
		t.Logf("%d job publishes were retried", len(retry))
	}
}

// waitStreamMsgs waits until stream holds at least n messages; progress,
// if set, is called with the count at every poll.
func waitStreamMsgs(t *testing.T, js jetstream.JetStream, stream string, n uint64, timeout time.Duration, progress func(uint64)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var have uint64
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		s, err := js.Stream(ctx, stream)
		cancel()
		if err == nil {
			have = s.CachedInfo().State.Msgs
			if progress != nil {
				progress(have)
			}
			if have >= n {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s holds %d messages after %s, want %d (last error: %v)", stream, have, timeout, n, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// readStream reads every message of stream (want of them, at least) with
// an ordered consumer. A cluster that has just lost a server may answer a
// JetStream request with no responders while a leader is elected: the read
// starts over then, for up to two minutes.
func readStream(t *testing.T, js jetstream.JetStream, stream string, want int) []jetstream.Msg {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		out, err := readStreamOnce(js, stream, want, deadline)
		if err == nil {
			return out
		}
		if time.Now().After(deadline) {
			t.Fatalf("read %s: %d of %d messages: %v", stream, len(out), want, err)
		}
		t.Logf("read %s: %v; reading again", stream, err)
		time.Sleep(time.Second)
	}
}

func readStreamOnce(js jetstream.JetStream, stream string, want int, deadline time.Time) ([]jetstream.Msg, error) {
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	cons, err := js.OrderedConsumer(ctx, stream, jetstream.OrderedConsumerConfig{})
	if err != nil {
		return nil, err
	}
	var out []jetstream.Msg
	for len(out) < want {
		batch, err := cons.Fetch(1000, jetstream.FetchMaxWait(2*time.Second))
		if err != nil {
			return out, err
		}
		got := 0
		for m := range batch.Messages() {
			out = append(out, m)
			got++
		}
		if err := batch.Error(); err != nil && !errors.Is(err, nats.ErrTimeout) {
			return out, err
		}
		if got == 0 && time.Now().After(deadline) {
			return out, fmt.Errorf("only %d of %d messages", len(out), want)
		}
	}
	return out, nil
}

// streamInfo returns the info of stream, asking again for up to 30 s while
// the cluster elects a leader.
func streamInfo(t *testing.T, js jetstream.JetStream, stream string) *jetstream.StreamInfo {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		s, err := js.Stream(ctx, stream)
		cancel()
		if err == nil {
			return s.CachedInfo()
		}
		if time.Now().After(deadline) {
			t.Fatalf("stream %s: %v", stream, err)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// waitJobResult waits for the stored result of job id in pool.
func waitJobResult(t *testing.T, js jetstream.JetStream, pool, id string, timeout time.Duration) *jetstream.RawStreamMsg {
	t.Helper()
	return waitLastMsg(t, js, "PYFLEET_RESULTS", "pyfleet.result."+pool+"."+id, timeout)
}

// waitDeadLetter waits for the dead letter of job id in pool.
func waitDeadLetter(t *testing.T, js jetstream.JetStream, pool, id string, timeout time.Duration) *jetstream.RawStreamMsg {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		for _, m := range deadLetters(t, js) {
			if m.Headers().Get(protocol.HeaderJobID) == id {
				md, _ := m.Metadata()
				return &jetstream.RawStreamMsg{Subject: m.Subject(), Header: m.Headers(), Data: m.Data(), Sequence: md.Sequence.Stream}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no dead letter for job %s after %s", id, timeout)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// deadLetters returns every message in PYFLEET_DEAD.
func deadLetters(t *testing.T, js jetstream.JetStream) []jetstream.Msg {
	t.Helper()
	n := int(streamInfo(t, js, "PYFLEET_DEAD").State.Msgs)
	if n == 0 {
		return nil
	}
	return readStream(t, js, "PYFLEET_DEAD", n)
}

func waitLastMsg(t *testing.T, js jetstream.JetStream, stream, subject string, timeout time.Duration) *jetstream.RawStreamMsg {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		s, err := js.Stream(ctx, stream)
		if err == nil {
			var m *jetstream.RawStreamMsg
			m, err = s.GetLastMsgForSubject(ctx, subject)
			if err == nil {
				cancel()
				return m
			}
		}
		cancel()
		if time.Now().After(deadline) {
			t.Fatalf("nothing on %s in %s after %s: %v", subject, stream, timeout, err)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// readLines returns the lines of a file, none if it does not exist.
func readLines(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	if len(bytes.TrimSpace(b)) == 0 {
		return nil
	}
	return strings.Split(strings.TrimSpace(string(b)), "\n")
}

// countLines counts lines equal to line in every *.log file of dir (the
// executions `work` recorded).
func countLines(t *testing.T, dir, line string) int {
	t.Helper()
	n := 0
	for id, c := range executions(t, dir) {
		if id == line {
			n += c.count
		}
	}
	return n
}

// execution counts the runs of one job id recorded by `work`, and where.
type execution struct {
	count int
	nodes []string // the node of each run
}

// executions reads the files `work` writes (one per worker, named
// node_run_worker.log, one job id a line) into runs per job id.
func executions(t *testing.T, dir string) map[string]*execution {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "*.log"))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*execution{}
	for _, f := range files {
		node, _, _ := strings.Cut(filepath.Base(f), "_")
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, id := range strings.Fields(string(b)) {
			e := out[id]
			if e == nil {
				e = &execution{}
				out[id] = e
			}
			e.count++
			e.nodes = append(e.nodes, node)
		}
	}
	return out
}

// runSubmitNoFatal is runSubmit for goroutines other than the test's: it
// reports a failure to start as exit code -1 instead of calling t.Fatal.
// The -race binary's one-second pause at exit (which waits for races in
// other goroutines) is turned off: tests that time calls or make many of
// them would measure it.
func runSubmitNoFatal(url string, args ...string) (string, string, int) {
	cmd := exec.Command(submitBin, append([]string{args[0], "--nats", url}, args[1:]...)...)
	cmd.Env = append(os.Environ(), "GORACE=atexit_sleep_ms=0")
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			return out.String(), errb.String() + err.Error(), -1
		}
		code = ee.ExitCode()
	}
	return out.String(), errb.String(), code
}
