package pool

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/lifecycle"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// testRun is the run id of the pools this test binary starts. Workers carry
// it in their marker, and a worker's exit kills whatever else carries its
// marker: two test binaries on one machine (two checkouts) must not share it.
var testRun = "r" + strconv.Itoa(os.Getpid())

func testPython(t testing.TB) string {
	t.Helper()
	py := os.Getenv("PYFLEET_TEST_PYTHON")
	if py == "" {
		py, _ = filepath.Abs("../python/.venv/bin/python")
	}
	if _, err := os.Stat(py); err != nil {
		t.Fatalf("no Python venv at %s: run `make venv`", py)
	}
	return py
}

// recorder keeps the events a pool emits.
type recorder struct {
	mu  sync.Mutex
	got []lifecycle.Event
}

func (r *recorder) add(e lifecycle.Event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if e.TS.IsZero() {
		e.TS = time.Now() // bus stamps events; here the test does
	}
	r.got = append(r.got, e)
}

func (r *recorder) has(match func(lifecycle.Event) bool) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, e := range r.got {
		if match(e) {
			return true
		}
	}
	return false
}

// waitFor polls for an event: the pool emits from its own goroutines.
func (r *recorder) waitFor(t *testing.T, what string, match func(lifecycle.Event) bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !r.has(match) {
		if time.Now().After(deadline) {
			t.Fatalf("no %s event; got %+v", what, r.got)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// startPool starts a pool of the test app; Close runs in cleanup.
func startPool(t testing.TB, mod func(*Config)) (*Pool, *recorder) {
	t.Helper()
	sockDir, err := os.MkdirTemp("", "pft")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	appDir, _ := filepath.Abs("testdata")
	rec := &recorder{}
	sp := lifecycle.NewSpawner()
	cfg := Config{
		Python:        testPython(t),
		App:           "app",
		AppDir:        appDir,
		SocketDir:     sockDir,
		Node:          "pooltest",
		Run:           testRun,
		Workers:       1,
		DeadlineGrace: 200 * time.Millisecond,
		Spawner:       sp,
		Events:        rec.add,
		Logger:        zaptest.NewLogger(t),
	}
	if mod != nil {
		mod(&cfg)
	}
	p, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(context.Background()); err != nil {
		sp.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.Close()
		sp.Close()
	})
	return p, rec
}

func callFn(p *Pool, timeout time.Duration, fn, payload string) (call.Result, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	dl, _ := ctx.Deadline()
	return p.Call(ctx, &call.Request{Function: fn, Payload: []byte(payload), Deadline: dl}, nil)
}

func codeOf(err error) int {
	var ce *call.Error
	if errors.As(err, &ce) {
		return ce.Code
	}
	return 0
}

func TestCallKinds(t *testing.T) {
	p, _ := startPool(t, func(c *Config) { c.Workers = 2 })
	if len(p.Functions()) != 10 {
		t.Errorf("functions %+v", p.Functions())
	}
	res, err := callFn(p, 5*time.Second, "echo", `{"a":[1,2]}`)
	if err != nil || string(res.Data) != `{"a":[1,2]}` || res.Worker == "" {
		t.Errorf("echo: %+v %v", res, err)
	}
	if _, err := callFn(p, 5*time.Second, "bad", `1`); codeOf(err) != call.CodeBadRequest {
		t.Errorf("bad: %v", err)
	}
	if _, err := callFn(p, 5*time.Second, "missing", `1`); codeOf(err) != call.CodeNotFound {
		t.Errorf("missing: %v", err)
	}

	var chunks []string
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = p.Call(ctx, &call.Request{Function: "gen", Payload: []byte("3")}, func(c call.Chunk) error {
		chunks = append(chunks, string(c.Data))
		return nil
	})
	if err != nil || len(chunks) != 3 || chunks[2] != `{"i":2}` {
		t.Errorf("gen: %v %q", err, chunks)
	}
}

// Two workers with one slot each run two slow calls at once.
func TestCallsRunInParallel(t *testing.T) {
	p, _ := startPool(t, func(c *Config) { c.Workers = 2 })
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for range 4 {
		wg.Go(func() {
			_, err := callFn(p, 10*time.Second, "sleep", "300")
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	// Serial would take 1.2 s; two at a time 0.6 s. The bound sits between.
	if took := time.Since(start); took > 1100*time.Millisecond {
		t.Errorf("4 calls of 300 ms on 2 workers took %s: not parallel", took)
	}
}

func TestQueueLimitAnswers503(t *testing.T) {
	p, _ := startPool(t, func(c *Config) { c.QueueLimit = 1 })
	running := make(chan error, 1)
	go func() {
		_, err := callFn(p, 10*time.Second, "sleep", "1000")
		running <- err
	}()
	waitUntil(t, func() bool { return p.Stats().Busy == 1 })
	queued := make(chan error, 1)
	go func() {
		_, err := callFn(p, 10*time.Second, "echo", "1")
		queued <- err
	}()
	waitUntil(t, func() bool { return p.Stats().Queued == 1 })
	if _, err := callFn(p, 10*time.Second, "echo", "2"); codeOf(err) != call.CodeUnavailable {
		t.Errorf("over the limit: %v, want 503", err)
	}
	if err := <-running; err != nil {
		t.Error(err)
	}
	if err := <-queued; err != nil {
		t.Error(err)
	}
}

// A call is counted in Idle by the time its Admitted hook runs (the job
// fetcher stops counting it then), and stays counted while it queues and
// runs: one worker, one slot, two calls.
func TestAdmittedCallsCountInIdle(t *testing.T) {
	p, _ := startPool(t, nil)
	if idle := p.Idle(); idle != 1 {
		t.Fatalf("Idle of an unused one-slot pool = %d", idle)
	}
	idleAtAdmission := make(chan int, 2)
	results := make(chan error, 2)
	for range 2 {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			dl, _ := ctx.Deadline()
			req := &call.Request{Function: "sleep", Payload: []byte("300"), Deadline: dl,
				Admitted: func() { idleAtAdmission <- p.Idle() }}
			_, err := p.Call(ctx, req, nil)
			results <- err
		}()
	}
	for range 2 {
		if idle := <-idleAtAdmission; idle > 0 {
			t.Errorf("Idle = %d when a call was admitted; the call itself must count", idle)
		}
	}
	waitUntil(t, func() bool { return p.Stats().Busy == 1 && p.Stats().Queued == 1 })
	if idle := p.Idle(); idle != -1 {
		t.Errorf("Idle = %d with one call running and one queued on one slot, want -1", idle)
	}
	for range 2 {
		if err := <-results; err != nil {
			t.Error(err)
		}
	}
	if idle := p.Idle(); idle != 1 {
		t.Errorf("Idle = %d after both calls ended", idle)
	}
}

// A sync call that overruns its deadline by the grace gets its worker
// killed and replaced; the caller gets 408.
func TestDeadlineKillsSyncWorker(t *testing.T) {
	p, rec := startPool(t, nil)
	before := p.Workers()["w1"]
	start := time.Now()
	_, err := callFn(p, 300*time.Millisecond, "sleep", "30000")
	if codeOf(err) != call.CodeDeadline {
		t.Fatalf("err %v, want 408", err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("caller waited %s past a 300 ms deadline", took)
	}
	rec.waitFor(t, "terminated(deadline)", func(e lifecycle.Event) bool {
		return e.Kind == lifecycle.KindTerminated && e.Reason == lifecycle.ReasonDeadline && e.PID == before
	})
	waitUntil(t, func() bool { pid := p.Workers()["w1"]; return pid != 0 && pid != before })
	if _, err := callFn(p, 5*time.Second, "echo", "1"); err != nil {
		t.Errorf("replacement: %v", err)
	}
}

// An async call is cancelled at its deadline by the worker itself.
func TestDeadlineCancelsAsync(t *testing.T) {
	p, rec := startPool(t, nil)
	before := p.Workers()["w1"]
	if _, err := callFn(p, 300*time.Millisecond, "slow_async", "30000"); codeOf(err) != call.CodeDeadline {
		t.Fatalf("err %v, want 408", err)
	}
	if _, err := callFn(p, 5*time.Second, "echo", "1"); err != nil {
		t.Fatal(err)
	}
	if p.Workers()["w1"] != before || rec.has(func(e lifecycle.Event) bool { return e.Kind == lifecycle.KindTerminated }) {
		t.Error("the worker was replaced; an async call should have been cancelled in place")
	}
}

// A worker killed mid-call fails the call at once, not at its deadline.
func TestWorkerDeathFailsCallPromptly(t *testing.T) {
	p, rec := startPool(t, nil)
	pid := p.Workers()["w1"]
	done := make(chan error, 1)
	start := time.Now()
	go func() {
		_, err := callFn(p, 30*time.Second, "sleep", "20000")
		done <- err
	}()
	waitUntil(t, func() bool { return p.Stats().Busy == 1 })
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	err := <-done
	if codeOf(err) != call.CodeFailed {
		t.Errorf("err %v, want 500 WorkerLost", err)
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("the call took %s to fail", took)
	}
	rec.waitFor(t, "crashed", func(e lifecycle.Event) bool { return e.Kind == lifecycle.KindCrashed && e.PID == pid })
	rec.waitFor(t, "restarted", func(e lifecycle.Event) bool { return e.Kind == lifecycle.KindRestarted })
}

func TestSessionPinsWorkerAnd410WhenGone(t *testing.T) {
	p, _ := startPool(t, func(c *Config) { c.Workers = 2 })
	var first string
	for i := range 10 {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		res, err := p.Call(ctx, &call.Request{Function: "pid", Payload: []byte("0"), Session: "s1"}, nil)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			first = string(res.Data)
		} else if string(res.Data) != first {
			t.Fatalf("session moved from pid %s to %s", first, res.Data)
		}
	}
	var pid int
	for _, c := range first {
		pid = pid*10 + int(c-'0')
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, func() bool { return !isWorker(p, pid) })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := p.Call(ctx, &call.Request{Function: "pid", Payload: []byte("0"), Session: "s1"}, nil)
	if codeOf(err) != call.CodeSessionLost {
		t.Errorf("err %v, want 410", err)
	}
}

// TestStartCallKeepsSessions: a session's first call goes through Call
// (StartCall leaves it: only an admitted call may bind a session); the
// calls after it start without a goroutine (call.Starter) on the
// session's worker; once that worker is gone StartCall leaves the call to
// Call again, which answers 410.
func TestStartCallKeepsSessions(t *testing.T) {
	p, _ := startPool(t, func(c *Config) { c.Workers = 2 })
	pidReq := func() *call.Request {
		return &call.Request{Function: "pid", Payload: []byte("0"), Session: "s1", Deadline: time.Now().Add(5 * time.Second)}
	}
	if _, ok, _ := startCall(t, p, pidReq()); ok {
		t.Fatal("the first call of a session was started before a call bound it")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	res, err := p.Call(ctx, pidReq(), nil)
	if err != nil {
		t.Fatal(err)
	}
	bound := string(res.Data)
	for range 6 {
		res, ok, err := startCall(t, p, pidReq())
		if !ok || err != nil {
			t.Fatalf("a call of a bound session: started %v, %v", ok, err)
		}
		if string(res.Data) != bound {
			t.Fatalf("session moved from pid %s to %s", bound, res.Data)
		}
	}
	pid, err := strconv.Atoi(bound)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, func() bool { return !isWorker(p, pid) })
	if _, ok, _ := startCall(t, p, pidReq()); ok {
		t.Fatal("a call of a session whose worker is gone was started")
	}
	if _, err := p.Call(ctx, pidReq(), nil); codeOf(err) != call.CodeSessionLost {
		t.Errorf("err %v, want 410", err)
	}
}

// isWorker reports whether pid is one of p's live workers.
func isWorker(p *Pool, pid int) bool {
	for _, live := range p.Workers() {
		if live == pid {
			return true
		}
	}
	return false
}

// startCall runs req through StartCall and waits for its end; ok is false
// when the pool left it to Call.
func startCall(t *testing.T, p *Pool, req *call.Request) (res call.Result, ok bool, err error) {
	t.Helper()
	type end struct {
		res call.Result
		err error
	}
	ended := make(chan end, 1)
	if _, ok := p.StartCall(req, func(res call.Result, err error) { ended <- end{res, err} }); !ok {
		return call.Result{}, false, nil
	}
	select {
	case e := <-ended:
		return e.res, true, e.err
	case <-time.After(10 * time.Second):
		t.Fatal("a started call did not end within 10 s")
		return call.Result{}, true, nil
	}
}

func TestDrainFinishesInFlight(t *testing.T) {
	p, _ := startPool(t, nil)
	done := make(chan error, 1)
	go func() {
		_, err := callFn(p, 10*time.Second, "sleep", "500")
		done <- err
	}()
	waitUntil(t, func() bool { return p.Stats().Busy == 1 })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.Drain(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Errorf("in-flight call: %v", err)
	}
	if _, err := callFn(p, time.Second, "echo", "1"); codeOf(err) != call.CodeUnavailable {
		t.Errorf("after drain: %v, want 503", err)
	}
}

// startTwoWorkers starts a pool of two workers on the app module name,
// whose source is src, and returns Start's error, the pool closed.
func startTwoWorkers(t *testing.T, name, src string) error {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, name+".py"), []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	sockDir, _ := os.MkdirTemp("", "pft")
	defer os.RemoveAll(sockDir)
	sp := lifecycle.NewSpawner()
	defer sp.Close()
	p, err := New(Config{Python: testPython(t), App: name, AppDir: dir, SocketDir: sockDir,
		Node: "n", Run: testRun, Workers: 2, Spawner: sp, Logger: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	return p.Start(context.Background())
}

func TestAppImportErrorStopsStart(t *testing.T) {
	err := startTwoWorkers(t, "broken", "raise ValueError('nope')\n")
	var appErr *AppError
	if !errors.As(err, &appErr) || appErr.Type != "ValueError" || appErr.Message != "nope" {
		t.Fatalf("err %v, want the app's ValueError", err)
	}
}

// A worker whose pyfleet runtime speaks another worker protocol (another
// release's pyfleet in the interpreter) stops the start with a
// *RuntimeError that names both versions, as a broken app does: no
// restart could help. The app stands in for an older runtime by changing
// the version its READY line says.
func TestOtherRuntimeVersionStopsStart(t *testing.T) {
	err := startTwoWorkers(t, "oldruntime", "from pyfleet import App, process\n"+
		"process.PROTOCOL_VERSION = 1\n"+
		"app = App()\n\n"+
		"@app.function\ndef echo(payload):\n    return payload\n")
	var rtErr *RuntimeError
	if !errors.As(err, &rtErr) || rtErr.Version != 1 {
		t.Fatalf("err %v, want a *RuntimeError for protocol v1", err)
	}
	if msg := err.Error(); !strings.Contains(msg, "v1") || !strings.Contains(msg, "v2") || !strings.Contains(msg, "install") {
		t.Fatalf("error %q should name both versions and the fix", msg)
	}
}

func waitUntil(t *testing.T, cond func() bool) {
	t.Helper()
	if !eventually(cond) {
		t.Fatal("condition not met within 20 s")
	}
}

// eventually reports whether cond holds within 20 s, checking every 5 ms.
func eventually(cond func() bool) bool {
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(5 * time.Millisecond)
	}
	return true
}

func countEvents(r *recorder, match func(lifecycle.Event) bool) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, e := range r.got {
		if match(e) {
			n++
		}
	}
	return n
}

func isRecycle(e lifecycle.Event) bool {
	return e.Kind == lifecycle.KindTerminated && e.Reason == lifecycle.ReasonRecycle
}

// Under steady load, --max-requests recycles workers and no call fails.
func TestMaxRequestsRecyclesWithoutFailures(t *testing.T) {
	p, rec := startPool(t, func(c *Config) { c.Workers = 2; c.MaxRequests = 25 })
	var wg sync.WaitGroup
	errs := make(chan error, 300)
	for g := range 4 {
		wg.Go(func() {
			for range 75 {
				if _, err := callFn(p, 20*time.Second, "sleep", strconv.Itoa(5+g)); err != nil {
					errs <- err
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("call failed during recycling: %v", err)
	}
	// 300 calls of 5 ms over workers that last about 25-27 calls each:
	// both first workers reach their limit under the load (while one's
	// replacement starts, the other takes every call). A recycle ends,
	// with its event, once the replacement serves and the old worker has
	// stopped, which on a loaded machine can be after the last call.
	eventually(func() bool { return countEvents(rec, isRecycle) >= 2 })
	if n := countEvents(rec, isRecycle); n < 2 {
		t.Errorf("%d recycles within 20 s of 300 calls with a limit of 25", n)
	}
	if n := countEvents(rec, func(e lifecycle.Event) bool { return e.Kind == lifecycle.KindCrashed }); n != 0 {
		t.Errorf("%d crashes", n)
	}
}

// A worker that leaks memory is recycled before it passes the limit by much,
// and no call fails meanwhile.
func TestMaxMemoryRecyclesLeakingWorker(t *testing.T) {
	p, rec := startPool(t, func(c *Config) {
		c.MaxMemory = 150 << 20
		c.MemoryInterval = 50 * time.Millisecond
	})
	for i := range 40 {
		if _, err := callFn(p, 20*time.Second, "leak", "10"); err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
		time.Sleep(20 * time.Millisecond) // leak at a pace the monitor can see
	}
	if n := countEvents(rec, isRecycle); n < 1 {
		t.Errorf("400 MB leaked in 10 MB steps, limit 150 MB: no recycle")
	}
}

// A worker that stops answering health checks is killed and replaced.
func TestHungWorkerIsReplaced(t *testing.T) {
	p, rec := startPool(t, func(c *Config) {
		c.HealthInterval = 100 * time.Millisecond
		c.HealthTimeout = 100 * time.Millisecond
	})
	before := p.Workers()["w1"]
	go func() { _, _ = callFn(p, 60*time.Second, "hang", "60") }()
	rec.waitFor(t, "terminated(unhealthy)", func(e lifecycle.Event) bool {
		return e.Kind == lifecycle.KindTerminated && e.Reason == lifecycle.ReasonUnhealthy && e.PID == before
	})
	waitUntil(t, func() bool { pid := p.Workers()["w1"]; return pid != 0 && pid != before })
	if _, err := callFn(p, 10*time.Second, "echo", "1"); err != nil {
		t.Errorf("replacement: %v", err)
	}
}
