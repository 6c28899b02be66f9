package pool

import (
	"context"
	"errors"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/lifecycle"
	"github.com/pyfleet/pyfleet/proto/workerpb"
)

// serving returns the worker now serving as name, or fails.
func serving(t *testing.T, p *Pool, name string) *worker {
	t.Helper()
	var w *worker
	waitUntil(t, func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		w = p.workers[name]
		return w != nil
	})
	return w
}

// injectBadFrame sends w a frame that cannot be marshalled (a request id
// that is not UTF-8), as a call admitted without Call's check would: the
// send fails and gRPC ends the stream, while the worker's process lives.
func injectBadFrame(t *testing.T, w *worker) {
	t.Helper()
	_, _ = w.begin(&workerpb.Call{Id: w.nextID.Add(1), Function: "echo", Payload: []byte("1"), RequestId: "\xff\xfe"})
	select {
	case <-w.lost:
	case <-time.After(5 * time.Second):
		t.Fatal("a frame that cannot be marshalled did not break the worker's channel")
	}
}

func isLostError(err error) bool {
	var ce *call.Error
	return errors.As(err, &ce) && ce.Code == call.CodeFailed && ce.Type == "WorkerLost"
}

// assertReplacedForChannelLoss checks what follows a channel loss of the
// worker old: it no longer counts from the moment of the loss (the caller
// checks right after it), it is killed and reported terminated/channel_lost
// (not crashed), a replacement serves, and its process is gone.
func assertReplacedForChannelLoss(t *testing.T, p *Pool, rec *recorder, old *worker) {
	t.Helper()
	oldPID := old.proc.PID()
	if pid := p.Workers()["w1"]; pid == oldPID {
		t.Errorf("the worker whose channel broke is still listed as serving")
	}
	if st := p.Stats(); st.Workers != 0 {
		t.Errorf("Stats counts %d workers right after the only one lost its channel", st.Workers)
	}
	if idle := p.Idle(); idle > 0 {
		t.Errorf("Idle is %d right after the only worker lost its channel", idle)
	}
	rec.waitFor(t, "terminated(channel_lost)", func(e lifecycle.Event) bool {
		return e.Kind == lifecycle.KindTerminated && e.Reason == lifecycle.ReasonChannelLost && e.PID == oldPID
	})
	if rec.has(func(e lifecycle.Event) bool { return e.Kind == lifecycle.KindCrashed && e.PID == oldPID }) {
		t.Error("a channel loss was also reported as a crash")
	}
	rec.waitFor(t, "restarted", func(e lifecycle.Event) bool {
		return e.Kind == lifecycle.KindRestarted && strings.Contains(e.Detail, "pid "+strconv.Itoa(oldPID))
	})
	if old.proc.Identity().Alive() {
		t.Errorf("the worker whose channel broke (pid %d) is still alive", oldPID)
	}
	if res, err := callFn(p, 10*time.Second, "echo", `"after"`); err != nil || string(res.Data) != `"after"` {
		t.Errorf("replacement: %q %v", res.Data, err)
	}
	if pid := p.Workers()["w1"]; pid == 0 || pid == oldPID {
		t.Errorf("serving pid %d after the replacement, old %d", pid, oldPID)
	}
}

// A frame that cannot be marshalled breaks the stream while the process
// lives: the call in flight fails at once, the worker is killed and
// replaced.
func TestChannelLostOnMarshalError(t *testing.T) {
	p, rec := startPool(t, func(c *Config) { c.Concurrency = 2 })
	w := serving(t, p, "w1")
	pending := make(chan error, 1)
	go func() {
		_, err := callFn(p, 60*time.Second, "sleep", "30000")
		pending <- err
	}()
	waitUntil(t, func() bool { return p.Stats().Busy == 1 })
	injectBadFrame(t, w)
	lostAt := time.Now()
	assertReplacedForChannelLoss(t, p, rec, w)
	select {
	case err := <-pending:
		if !isLostError(err) {
			t.Errorf("the call in flight got %v, want 500 WorkerLost", err)
		}
		// Promptly: bounded by the test's own checks, far from the
		// call's 30 s.
		if d := time.Since(lostAt); d > 20*time.Second {
			t.Errorf("the call in flight failed %s after the loss", d)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the call in flight did not fail after its worker's channel broke")
	}
}

// A result over the gRPC message limit: the worker's gRPC refuses to send
// it and ends the stream with RESOURCE_EXHAUSTED ("Sent message larger
// than max"), and the worker process lives on. The caller gets WorkerLost
// saying so, and the worker is replaced.
func TestChannelLostOnResultOverMessageLimit(t *testing.T) {
	p, rec := startPool(t, nil)
	w := serving(t, p, "w1")
	_, err := callFn(p, 60*time.Second, "big", "65")
	if !isLostError(err) {
		t.Fatalf("a 65 MB result: %v, want 500 WorkerLost", err)
	}
	if !strings.Contains(err.Error(), "larger than max") {
		t.Errorf("the error does not say the result was too large: %v", err)
	}
	assertReplacedForChannelLoss(t, p, rec, w)
}

// The worker's connection from the node is shut down under a call while
// the process goes on (its gRPC server is gone for the node).
func TestChannelLostWhenConnectionDropped(t *testing.T) {
	p, rec := startPool(t, nil)
	w := serving(t, p, "w1")
	start := time.Now()
	_, err := callFn(p, 60*time.Second, "drop_channel", "null")
	if !isLostError(err) {
		t.Fatalf("drop_channel: %v, want 500 WorkerLost", err)
	}
	if d := time.Since(start); d > 20*time.Second {
		t.Errorf("the call took %s to fail", d)
	}
	assertReplacedForChannelLoss(t, p, rec, w)
}

// Repeated channel losses back off like crashes and raise crash_loop.
func TestRepeatedChannelLossIsACrashLoop(t *testing.T) {
	p, rec := startPool(t, func(c *Config) {
		c.CrashLoop = 3
		c.RestartBackoff = 100 * time.Millisecond
		c.MaxRestartBackoff = 10 * time.Second
	})
	var pids []int
	for range 3 {
		var w *worker
		waitUntil(t, func() bool {
			p.mu.Lock()
			defer p.mu.Unlock()
			w = p.workers["w1"]
			return w != nil && (len(pids) == 0 || w.proc.PID() != pids[len(pids)-1])
		})
		pids = append(pids, w.proc.PID())
		injectBadFrame(t, w)
		rec.waitFor(t, "terminated(channel_lost)", func(e lifecycle.Event) bool {
			return e.Kind == lifecycle.KindTerminated && e.Reason == lifecycle.ReasonChannelLost && e.PID == w.proc.PID()
		})
	}
	rec.waitFor(t, "crash_loop", func(e lifecycle.Event) bool { return e.Kind == lifecycle.KindCrashLoop })
	// The third loss in a row waits a backoff of 400 ms less up to half
	// of it for jitter before the next start; without backoff the next
	// spawn would follow at once.
	var lostAt, next time.Time
	rec.waitFor(t, "the spawn after the third loss", func(e lifecycle.Event) bool {
		if e.Kind == lifecycle.KindTerminated && e.PID == pids[2] {
			lostAt = e.TS
		}
		if e.Kind == lifecycle.KindSpawned && !lostAt.IsZero() && e.TS.After(lostAt) {
			next = e.TS
			return true
		}
		return false
	})
	if gap := next.Sub(lostAt); gap < 200*time.Millisecond {
		t.Errorf("the start after the third channel loss in a row came %s after it: no backoff", gap)
	}
	if n := countEvents(rec, func(e lifecycle.Event) bool { return e.Kind == lifecycle.KindCrashed }); n != 0 {
		t.Errorf("%d channel losses reported as crashes", n)
	}
	if _, err := callFn(p, 20*time.Second, "echo", "1"); err != nil {
		t.Errorf("after the crash loop: %v", err)
	}
}

// Crashes back off and make crash_loop. testdata/crashy.py dies 300 ms
// after the node connects to it, on a plan: four starts in a row, then one
// that serves longer than stableAfter before it dies, then two more quick
// ones; the eighth start lives. Each restart waits between half of the
// backoff and all of it (the jitter), the backoff doubling from
// RestartBackoff up to MaxRestartBackoff; crash_loop follows the CrashLoop-th
// crash in a row; and the long-lived start's crash counts as the first of a
// new run, which the second crash_loop (failures == CrashLoop again) proves
// without timing.
func TestCrashesBackOffAndLoop(t *testing.T) {
	const (
		base        = 100 * time.Millisecond
		maxBackoff  = 800 * time.Millisecond
		crashLoop   = 3
		stableAfter = 3 * time.Second
		// Upper bound on a restart's delay beyond the backoff: a fork on a
		// busy machine. The lower bounds show the growth.
		slack = time.Second
	)
	const quick, long = "300", "3500" // ms each start lives once the node connected
	plan := []string{quick, quick, quick, quick, long, quick, quick}
	planPath := filepath.Join(t.TempDir(), "plan")
	if err := os.WriteFile(planPath, []byte(strings.Join(plan, "\n")), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("CRASHY_PLAN", planPath)
	p, rec := startPool(t, func(c *Config) {
		c.App = "crashy"
		c.RestartBackoff = base
		c.MaxRestartBackoff = maxBackoff
		c.CrashLoop = crashLoop
		c.stableAfter = stableAfter
	})

	// Every start of the plan crashed, and the one after it is ready.
	deadline := time.Now().Add(2 * time.Minute)
	for countEvents(rec, func(e lifecycle.Event) bool { return e.Kind == lifecycle.KindReady }) <= len(plan) {
		if time.Now().After(deadline) {
			rec.mu.Lock()
			defer rec.mu.Unlock()
			t.Fatalf("the plan's %d crashes and a live start did not happen within 2 min; events %+v", len(plan), rec.got)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if res, err := callFn(p, 10*time.Second, "echo", `"alive"`); err != nil || string(res.Data) != `"alive"` {
		t.Errorf("the start that lives: %q %v", res.Data, err)
	}

	type start struct {
		pid              int
		spawned, crashed time.Time
		loop             bool // crash_loop came right after its crash
	}
	var starts []*start
	rec.mu.Lock()
	for _, e := range rec.got {
		switch e.Kind {
		case lifecycle.KindSpawned:
			starts = append(starts, &start{pid: e.PID, spawned: e.TS})
		case lifecycle.KindCrashed:
			s := starts[len(starts)-1]
			if e.PID != s.pid || e.ExitCode == nil || *e.ExitCode != 3 {
				t.Errorf("crash %+v, want pid %d with exit code 3", e, s.pid)
			}
			s.crashed = e.TS
		case lifecycle.KindCrashLoop:
			starts[len(starts)-1].loop = true
		case lifecycle.KindSpawnFailed, lifecycle.KindTerminated:
			t.Errorf("unexpected %+v: every start should serve, then crash", e)
		}
	}
	rec.mu.Unlock()
	if len(starts) != len(plan)+1 {
		t.Fatalf("%d starts, want %d", len(starts), len(plan)+1)
	}

	// What supervise must have done, crash by crash.
	backoff, failures, loops := base, 0, 0
	for i, s := range starts[:len(plan)] {
		life := s.crashed.Sub(s.spawned)
		if plan[i] == long {
			if life <= stableAfter {
				t.Fatalf("start %d lived %s, not over stableAfter (%s): the plan did not hold", i+1, life, stableAfter)
			}
			failures, backoff = 0, base
		} else if life > stableAfter {
			t.Fatalf("quick start %d lived %s, over stableAfter (%s): the machine is too slow for the plan", i+1, life, stableAfter)
		}
		failures++
		if want := failures == crashLoop; s.loop != want {
			t.Errorf("crash %d is failure %d in a row: crash_loop after it %v, want %v", i+1, failures, s.loop, want)
		}
		if s.loop {
			loops++
		}
		gap := starts[i+1].spawned.Sub(s.crashed)
		t.Logf("crash %d (failure %d in a row, backoff %s): restarted after %s", i+1, failures, backoff, gap)
		if gap < backoff/2 || gap > backoff+slack {
			t.Errorf("crash %d: restarted after %s, want %s to %s (backoff %s less up to half for jitter)",
				i+1, gap, backoff/2, backoff+slack, backoff)
		}
		backoff = min(2*backoff, maxBackoff)
	}
	if loops != 2 {
		t.Errorf("%d crash_loop events, want 2: after the 3rd crash, and the 3rd after the long-lived start", loops)
	}
}

// Strings that travel as proto strings must be UTF-8: Call refuses the
// others with 400 before anything reaches a worker, and starts no session.
func TestCallRefusesInvalidUTF8(t *testing.T) {
	p, rec := startPool(t, nil)
	for _, req := range []call.Request{
		{Function: "echo\xff", Payload: []byte("1")},
		{Function: "echo", Payload: []byte("1"), RequestID: "id\xfe"},
		{Function: "echo", Payload: []byte("1"), Session: "s\xc3"},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := p.Call(ctx, &req, nil)
		cancel()
		var ce *call.Error
		if !errors.As(err, &ce) || ce.Code != call.CodeBadRequest || !strings.Contains(ce.Message, "UTF-8") {
			t.Errorf("%+q %+q %+q: %v, want 400 naming UTF-8", req.Function, req.RequestID, req.Session, err)
		}
	}
	if n := len(p.sessions); n != 0 {
		t.Errorf("%d sessions after refused calls", n)
	}
	if _, err := callFn(p, 5*time.Second, "echo", "1"); err != nil {
		t.Error(err)
	}
	if rec.has(func(e lifecycle.Event) bool {
		return e.Kind == lifecycle.KindTerminated || e.Kind == lifecycle.KindCrashed
	}) {
		t.Error("a refused call cost a worker")
	}
}

// A deadline beyond what the frame's 32-bit millisecond field holds is not
// wrapped into a short one: 2^32 ms + 100 ms would wrap to 100 ms, and the
// worker would cancel this 300 ms async call.
func TestDeadlineOverUint32MillisecondsNotCutShort(t *testing.T) {
	p, _ := startPool(t, nil)
	dl := time.Now().Add(time.Duration(math.MaxUint32+1+100) * time.Millisecond)
	ctx, cancel := context.WithDeadline(context.Background(), dl)
	defer cancel()
	res, err := p.Call(ctx, &call.Request{Function: "slow_async", Payload: []byte("300"), Deadline: dl}, nil)
	if err != nil || string(res.Data) != "300" {
		t.Fatalf("a 300 ms call with a deadline of 2^32+100 ms: %q %v", res.Data, err)
	}
}
