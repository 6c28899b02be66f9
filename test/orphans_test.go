package test

// The zero-orphan promise (README.md, "How a worker is supervised"; issue 3), proven by killing
// things: one test per row of the issue, each with a real poolnode, real
// Python workers running test/apps/nasty.py, and real signals. Each test
// names every process of the tree the node started by pid and start time
// before the event, and after it checks (a) that each one is gone and no
// process carries the node's marker any more, (b) that processes pyfleet did
// not start survive (bystanders: a plain sleep and one carrying the marker
// of a run the state dir does not know), and (c) which lifecycle events were
// published.

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"golang.org/x/sys/unix"

	"github.com/pyfleet/pyfleet/lifecycle"
)

// Row 1: a clean stop with SIGTERM, and a second SIGTERM during the drain.
func TestOrphansCleanStop(t *testing.T) { inBothModes(t, testOrphansCleanStop) }

func testOrphansCleanStop(t *testing.T, preload bool) {
	by := startBystanders(t)

	t.Run("SIGTERM", func(t *testing.T) {
		n := startNode(t, nodeOptions{preload: preload, app: nastyApp(), workers: 2})
		nc := n.connect()
		ev := watchEvents(t, nc, "default")
		var sp spawnReply
		callOK(t, nc, fnSubject("spawn"), `{}`, &sp)
		var ss setsidReply
		callOK(t, nc, fnSubject("setsid_sleep"), `{"how":"sh"}`, &ss)
		workers := n.workerPIDs() // as events name them
		tree := n.tree(t, sp.Child, ss.Grandchild)
		if len(workers) != 2 || len(tree) != 4 {
			t.Fatalf("want 2 workers, a child and a setsid grandchild; have workers %v in %v", workers, pidsOf(tree))
		}

		n.signal(syscall.SIGTERM)
		if code := n.wait(30 * time.Second); code != 0 {
			t.Fatalf("exit status %d, want 0", code)
		}
		assertGone(t, "after the clean stop", tree, time.Second)
		n.assertNoLeftovers(time.Second)

		ev.waitFor(5*time.Second, kind(lifecycle.KindNodeStopped))
		stopping := firstIndex(ev, kind(lifecycle.KindNodeStopping))
		stopped := firstIndex(ev, kind(lifecycle.KindNodeStopped))
		terminated := matching(ev, terminatedFor(lifecycle.ReasonStop))
		var termPIDs []int
		for _, e := range terminated {
			termPIDs = append(termPIDs, e.PID)
		}
		slices.Sort(termPIDs)
		if !slices.Equal(termPIDs, workers) {
			t.Errorf("terminated(stop) for pids %v, want one per worker %v; events %v", termPIDs, workers, ev.kinds())
		}
		if stopping < 0 || stopping > firstIndex(ev, terminatedFor(lifecycle.ReasonStop)) ||
			lastIndex(ev, terminatedFor(lifecycle.ReasonStop)) > stopped {
			t.Errorf("want node_stopping, terminated(stop)..., node_stopped in that order; got %v", ev.kinds())
		}
		// The grandchild left the worker's group: the node found it by its
		// marker, and every kill is an event.
		if len(matching(ev, allOf(kind(lifecycle.KindOrphanReaped), withPID(ss.Grandchild)))) != 1 {
			t.Errorf("no orphan_reaped event for the setsid grandchild %d: %v", ss.Grandchild, ev.kinds())
		}
		if c := ev.count(kind(lifecycle.KindCrashed)); c != 0 {
			t.Errorf("%d crashed events on a clean stop: %v", c, ev.kinds())
		}
		by.assertAlive(t)
	})

	t.Run("second SIGTERM during the drain", func(t *testing.T) {
		const grace = 10 * time.Second
		n := startNode(t, nodeOptions{preload: preload, app: nastyApp(), workers: 2, extra: []string{"--shutdown-grace", grace.String()}})
		nc := n.connect()
		ev := watchEvents(t, nc, "default")
		var sp spawnReply
		callOK(t, nc, fnSubject("spawn"), `{}`, &sp)
		touch := filepath.Join(shortTempDir(t), "busy")
		answered := make(chan error, 1)
		go func() {
			_, err := request(nc, fnSubject("sleep_ms"), fmt.Sprintf(`{"ms":60000,"touch":%q}`, touch), 120*time.Second)
			answered <- err
		}()
		busy := waitTouch(t, touch, 30*time.Second)
		workers := n.workerPIDs() // as events name them
		tree := n.tree(t, sp.Child, busy)
		if len(workers) != 2 || len(tree) != 3 {
			t.Fatalf("want 2 workers and a child; have workers %v in %v", workers, pidsOf(tree))
		}

		first := time.Now()
		n.signal(syscall.SIGTERM)
		ev.waitFor(10*time.Second, kind(lifecycle.KindNodeStopping))
		// The long call holds the drain; the second signal ends it.
		select {
		case <-n.done:
			t.Fatal("the node exited before the second signal: the long call did not hold the drain")
		default:
		}
		n.signal(syscall.SIGTERM)
		code := n.wait(30 * time.Second)
		took := time.Since(first)
		t.Logf("first SIGTERM to exit: %s (grace %s)", took.Round(time.Millisecond), grace)
		if code != 0 {
			t.Errorf("exit status %d, want 0", code)
		}
		if took > grace/2 {
			t.Errorf("the node took %s to stop after a second signal; it should not wait for the %s grace", took, grace)
		}
		assertGone(t, "after the second signal", tree, time.Second)
		n.assertNoLeftovers(time.Second)
		ev.waitFor(5*time.Second, kind(lifecycle.KindNodeStopped))
		if got := ev.count(terminatedFor(lifecycle.ReasonStop)); got != 2 {
			t.Errorf("%d terminated(stop) events, want 2: %v", got, ev.kinds())
		}
		select {
		case <-answered: // an error answer or a closed connection: either way, not a hang
		case <-time.After(10 * time.Second):
			t.Error("the caller of the long call still waits after the node exited")
		}
		by.assertAlive(t)
	})
}

// Row 2: kill -9 of the poolnode with 8 workers, each with a multiprocessing
// child and grandchild: all 24 gone within 1 s, without a restart.
func TestOrphansKillNineNode(t *testing.T) { inBothModes(t, testOrphansKillNineNode) }

func testOrphansKillNineNode(t *testing.T, preload bool) {
	const workers = 8
	url := startTestNATS(t)
	by := startBystanders(t)
	nc := connectURL(t, url)
	ev := watchEvents(t, nc, "default")
	state := shortTempDir(t)
	n := startNode(t, onNATS(url, nodeOptions{preload: preload, app: nastyApp(), workers: workers, stateDir: state}))
	run := runOf(t, ev, n)

	// One tree per worker: each call keeps its worker busy a while, so
	// concurrent calls land on different workers; once=true makes a worker
	// that already has its tree answer without making another.
	trees := map[int]mpReply{}
	for round := 0; len(trees) < workers && round < 20; round++ {
		var mu sync.Mutex
		var wg sync.WaitGroup
		for range workers {
			wg.Go(func() {
				msg, err := request(nc, fnSubject("mp_tree"), `{"once":true,"hold_ms":300}`, 30*time.Second)
				if err != nil || msg.Header.Get("Pyfleet-Status") != "ok" {
					t.Errorf("mp_tree: %v %v", err, msgData(msg))
					return
				}
				var r mpReply
				if err := json.Unmarshal(hostPIDs(t, msg.Data), &r); err != nil {
					t.Errorf("mp_tree: %q: %v", msg.Data, err)
					return
				}
				mu.Lock()
				trees[r.PID] = r
				mu.Unlock()
			})
		}
		wg.Wait()
		if t.Failed() {
			t.FailNow()
		}
	}
	if len(trees) != workers {
		t.Fatalf("multiprocessing trees on %d workers, want %d", len(trees), workers)
	}
	var pids []int
	for _, r := range trees {
		pids = append(pids, r.PID, r.Child, r.Grandchild)
	}
	ids := identify(t, pids...)
	tree := n.tree(t, pids...)
	if len(tree) != 3*workers {
		t.Fatalf("the node has %d processes, want %d: %v", len(tree), 3*workers, pidsOf(tree))
	}

	killed := n.killNine(t)
	_, left := waitGone(ids, 10*time.Second)
	if len(left) > 0 {
		killIdentities(left)
		t.Fatalf("still running 10 s after the node's SIGKILL: %v", left)
	}
	// And everything else the run started and marked: its template and
	// the workers' inits, which the trees' pids do not name. They count in
	// the time too: a kill of the node is over when the last one is gone.
	var rest []lifecycle.Identity
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(200 * time.Microsecond) {
		if rest = runProcesses(n.name, run); len(rest) == 0 || time.Now().After(deadline) {
			break
		}
	}
	took := time.Since(killed)
	t.Logf("kill -9 of the node to the last of its %d processes and the rest of its run gone: %s", len(ids), took.Round(100*time.Microsecond))
	if len(rest) > 0 {
		t.Errorf("processes of the killed run still running 10 s after: %s", describe(rest))
		killIdentities(rest)
	}
	if took > time.Second {
		t.Errorf("the last process went %s after the node's SIGKILL, want within 1 s", took)
	}
	n.wait(10 * time.Second)

	// A node that starts again on the state dir finds nothing to reap; it
	// publishes what the dead node's guardian killed as the node died
	// (the dead node could not), and those processes are already gone.
	again := startNode(t, onNATS(url, nodeOptions{preload: preload, app: nastyApp(), workers: 1, stateDir: state, name: n.name}))
	run2 := runOf(t, ev, again)
	ev.waitFor(30*time.Second, func(e lifecycle.Event) bool { return e.Kind == lifecycle.KindReady && e.Run == run2 })
	for _, e := range matching(ev, kind(lifecycle.KindOrphanReaped)) {
		if !strings.HasPrefix(e.Detail, "guardian:") {
			t.Errorf("the next node had orphans to reap; they outlived the node's SIGKILL: %+v", e)
		} else if e.Run != run {
			t.Errorf("a guardian's kill reported for run %q, want %q: %+v", e.Run, run, e)
		}
	}
	again.stopClean(t)
	by.assertAlive(t)
}

// Row 3: a worker that ignores SIGTERM, and workers stuck in a C-level
// sleep (in a call thread, and on the event loop): a clean stop still ends
// them, with SIGKILL after the worker stop grace.
func TestOrphansStubbornWorkers(t *testing.T) { inBothModes(t, testOrphansStubbornWorkers) }

func testOrphansStubbornWorkers(t *testing.T, preload bool) {
	by := startBystanders(t)
	// Two calls per worker: a sync call then runs in a call thread, not
	// inline on the worker's event loop.
	n := startNode(t, nodeOptions{preload: preload, app: nastyApp(), workers: 3, extra: []string{"--shutdown-grace", "1s", "--concurrency", "2"}})
	nc := n.connect()
	ev := watchEvents(t, nc, "default")
	dir := shortTempDir(t)
	// A new session goes to the worker with the fewest calls in flight, so
	// each of these lands on a worker of its own.
	session := func(fn, body string) (*nats.Msg, error) {
		msg := nats.NewMsg(fnSubject(fn))
		msg.Data = []byte(body)
		msg.Header.Set("Pyfleet-Timeout", "120000")
		msg.Header.Set("Pyfleet-Session", fn)
		return nc.RequestMsg(msg, 125*time.Second)
	}
	block := func(fn string) int {
		touch := filepath.Join(dir, fn)
		go func() {
			// Answered with an error when the node kills the worker, or
			// cut off when the node exits.
			_, _ = session(fn, fmt.Sprintf(`{"touch":%q}`, touch))
		}()
		return waitTouch(t, touch, 30*time.Second)
	}
	inThread := block("c_sleep")    // a call thread in C; the loop still sees SIGTERM
	onLoop := block("c_sleep_loop") // the event loop itself in C: SIGTERM never handled
	msg, err := session("ignore_sigterm", `{}`)
	if err != nil || msg.Header.Get("Pyfleet-Status") != "ok" {
		t.Fatalf("ignore_sigterm: %v %s", err, msgData(msg))
	}
	var ig pidReply
	if err := json.Unmarshal(hostPIDs(t, msg.Data), &ig); err != nil {
		t.Fatal(err)
	}
	workers := n.pythonPIDs(t)
	supervised := map[int]int{} // as events name them
	for _, pid := range workers {
		supervised[pid] = supervisedOf(t, pid)
	}
	stubborn := []int{inThread, onLoop, ig.PID}
	if slices.Sort(stubborn); !slices.Equal(stubborn, workers) {
		t.Fatalf("want the three calls on the three workers %v, got %v", workers, stubborn)
	}
	if !ignores(t, ig.PID, syscall.SIGTERM) {
		t.Fatalf("worker %d does not ignore SIGTERM", ig.PID)
	}
	if th := touchThread(t, filepath.Join(dir, "c_sleep")); !strings.HasPrefix(th, "pyfleet-call") {
		t.Fatalf("c_sleep runs on thread %q, want a call thread", th)
	}
	if th := touchThread(t, filepath.Join(dir, "c_sleep_loop")); th != "MainThread" {
		t.Fatalf("c_sleep_loop runs on thread %q, want the event loop's MainThread", th)
	}
	tree := n.tree(t, workers...)

	start := time.Now()
	n.signal(syscall.SIGTERM)
	code := n.wait(60 * time.Second)
	t.Logf("SIGTERM to exit with three stubborn workers: %s", time.Since(start).Round(time.Millisecond))
	if code != 0 {
		t.Errorf("exit status %d, want 0", code)
	}
	assertGone(t, "after the clean stop", tree, time.Second)
	n.assertNoLeftovers(time.Second)

	ev.waitFor(5*time.Second, kind(lifecycle.KindNodeStopped))
	for _, pid := range workers {
		es := matching(ev, allOf(kind(lifecycle.KindTerminated), withPID(supervised[pid])))
		if len(es) != 1 || es[0].Reason != lifecycle.ReasonStop || es[0].Signal != "SIGKILL" {
			t.Errorf("worker %d: want one terminated event, reason stop, signal SIGKILL; got %+v", pid, es)
		}
	}
	if c := ev.count(kind(lifecycle.KindCrashed)); c != 0 {
		t.Errorf("%d crashed events: %v", c, ev.kinds())
	}
	by.assertAlive(t)
}

// touchThread is the thread that ran a call, as its touch file says.
func touchThread(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var r struct {
		Thread string `json:"thread"`
	}
	if err := json.Unmarshal(b, &r); err != nil {
		t.Fatalf("%s: %q: %v", path, b, err)
	}
	return r.Thread
}

// ignores reports whether pid ignores sig (/proc/<pid>/status SigIgn).
func ignores(t *testing.T, pid int, sig syscall.Signal) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "SigIgn:"); ok {
			mask, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			return mask&(1<<(uint(sig)-1)) != 0
		}
	}
	t.Fatalf("no SigIgn in /proc/%d/status", pid)
	return false
}

// Row 3: a worker that exits by itself: crashed with its exit code, then
// restarted, and the replacement serves; its child goes with it.
func TestOrphansWorkerExits(t *testing.T) { inBothModes(t, testOrphansWorkerExits) }

func testOrphansWorkerExits(t *testing.T, preload bool) {
	by := startBystanders(t)
	n := startNode(t, nodeOptions{preload: preload, app: nastyApp(), workers: 1})
	nc := n.connect()
	ev := watchEvents(t, nc, "default")
	var sp spawnReply
	callOK(t, nc, fnSubject("spawn"), `{}`, &sp)
	tree := n.tree(t, sp.PID, sp.Child)
	supervised := supervisedOf(t, sp.PID)

	msg, err := request(nc, fnSubject("exit_now"), `{"code":3}`, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if code := msg.Header.Get("Nats-Service-Error-Code"); code != "500" || !strings.Contains(string(msg.Data), "WorkerLost") {
		t.Errorf("the call whose worker exited got %v %s, want 500 WorkerLost", msg.Header, msg.Data)
	}
	crashed := ev.waitFor(10*time.Second, allOf(kind(lifecycle.KindCrashed), withPID(supervised)))
	if crashed.ExitCode == nil || *crashed.ExitCode != 3 || crashed.Signal != "" {
		t.Errorf("crashed event %+v, want exit code 3", crashed)
	}
	assertGone(t, "after the worker exited", tree, 5*time.Second)
	restarted := ev.waitFor(30*time.Second, kind(lifecycle.KindRestarted))
	if restarted.Worker != crashed.Worker || restarted.PID == supervised || restarted.PID == 0 {
		t.Errorf("restarted event %+v after crashed %+v", restarted, crashed)
	}
	if firstIndex(ev, kind(lifecycle.KindCrashed)) > firstIndex(ev, kind(lifecycle.KindRestarted)) {
		t.Errorf("restarted before crashed: %v", ev.kinds())
	}
	var p pidReply
	callOK(t, nc, fnSubject("pid"), `{}`, &p)
	if supervisedOf(t, p.PID) != restarted.PID {
		t.Errorf("served by pid %d, want the replacement %d", p.PID, restarted.PID)
	}
	n.stopClean(t)
	by.assertAlive(t)
}

// Row 4: a grandchild that called setsid and double-forked (two ways), then
// kill -9 of the poolnode: gone at the latest when a node starts again on the
// state dir, and its kill reported as an orphan_reaped event naming its pid,
// its old node and its run. Killed alone, the node may leave helpers that act
// on its death; killed with them (as the OOM killer or a cgroup kill would),
// only the next node on the state dir is left to do it.
//
// In group mode: the layers every host has (markers, the guardian, the next
// node's reaper) are what this row tests. In the kernel modes nothing
// outlives the node for them to find: the PID namespaces die with it
// (TestOrphansKillNodeAndGuardian, TestContainmentPIDNSKillNineNodeAndGuardian).
func TestOrphansSetsidGrandchild(t *testing.T) { inBothModes(t, testOrphansSetsidGrandchild) }

func testOrphansSetsidGrandchild(t *testing.T, preload bool) {
	url := startTestNATS(t)
	by := startBystanders(t)
	for _, tc := range []struct {
		name    string
		helpers bool
	}{
		{"kill -9 of the node", false},
		{"kill -9 of the node and its helpers", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			nc := connectURL(t, url)
			ev := watchEvents(t, nc, "default")
			state := shortTempDir(t)
			n := startNode(t, onNATS(url, nodeOptions{preload: preload, app: nastyApp(), workers: 2, stateDir: state, extra: []string{"--containment", lifecycle.ModeGroup}}))
			run := runOf(t, ev, n)

			var sh, fk setsidReply
			callOK(t, nc, nodeSubject(n.name, "setsid_sleep"), `{"how":"sh"}`, &sh)
			callOK(t, nc, nodeSubject(n.name, "setsid_sleep"), `{"how":"fork"}`, &fk)
			var sp spawnReply
			callOK(t, nc, nodeSubject(n.name, "spawn"), `{}`, &sp)
			grandchildren := identify(t, sh.Grandchild, fk.Grandchild)
			ourSession, _ := unix.Getsid(0)
			for _, id := range grandchildren {
				pi, err := readProcInfo(id.PID)
				if err != nil || pi.sid == ourSession || pi.sid == id.PID {
					t.Fatalf("grandchild %d: %+v %v; want a new session that it does not lead", id.PID, pi, err)
				}
			}
			workers := identify(t, n.pythonPIDs(t)...)
			tree := n.tree(t, sh.Grandchild, fk.Grandchild, sp.Child)
			if len(workers) != 2 || len(tree) != 5 {
				t.Fatalf("want 2 workers, a child and two grandchildren; have workers %v in %v", pidsOf(workers), pidsOf(tree))
			}
			started, groups := startedBy(workers, tree)

			if tc.helpers {
				n.killNineWithHelpers(t)
			} else {
				n.killNine(t)
			}
			n.wait(10 * time.Second)
			// The workers die with the node: the kernel sends their
			// parent-death signal.
			took, left := waitGone(workers, 5*time.Second)
			if len(left) > 0 {
				killIdentities(left)
				t.Fatalf("workers still running 5 s after the node's SIGKILL: %v", left)
			}
			if took > time.Second {
				t.Errorf("the workers went %s after the node's SIGKILL, want within 1 s", took)
			}
			waitGone(started, time.Second)
			survivors := undoomed(started)
			if len(survivors) > 0 {
				t.Logf("1 s after the node's SIGKILL, still running: %v of the workers' children %v", pidsOf(survivors), pidsOf(started))
			}

			again := startNode(t, onNATS(url, nodeOptions{preload: preload, app: nastyApp(), workers: 1, stateDir: state, name: n.name}))
			// The sweep runs before the node serves, and its events come
			// before the first worker's.
			assertGone(t, "once a node started again on the state dir", tree, time.Second)
			run2 := runOf(t, ev, again)
			ev.waitFor(30*time.Second, func(e lifecycle.Event) bool { return e.Kind == lifecycle.KindReady && e.Run == run2 })
			if left := runProcesses(n.name, run); len(left) > 0 {
				t.Errorf("processes of the killed run still running: %v", left)
			}
			// Every kill is an event: published by the next node's reaper;
			// or, for what the node's guardian killed as the node died
			// (its NATS connection gone with it), logged on the node's
			// stderr. Only a worker's lifeline, killing its own group as
			// the node dies, leaves no event.
			logged := n.loggedEvents()
			for _, id := range started {
				survived := slices.Contains(survivors, id)
				es := matching(ev, allOf(kind(lifecycle.KindOrphanReaped), withPID(id.PID)))
				where := "published"
				if len(es) == 0 && !survived {
					es = filterEvents(logged, allOf(kind(lifecycle.KindOrphanReaped), withPID(id.PID)))
					where = "logged on the dead node's stderr, not published"
				}
				switch {
				case len(es) == 0 && !survived && groups[id.PID]:
					t.Logf("pid %d, in its worker's process group, died with the node without an event: its worker's lifeline killed the group", id.PID)
				case len(es) == 0:
					t.Errorf("pid %d (started by a worker) was killed, but no orphan_reaped event names it; published: %v", id.PID, ev.kinds())
				case es[0].Node != n.name || es[0].Run != run:
					t.Errorf("orphan_reaped for %d names node %q run %q, want %q %q", id.PID, es[0].Node, es[0].Run, n.name, run)
				default:
					t.Logf("orphan_reaped for pid %d %s: %s", id.PID, where, es[0].Detail)
				}
			}
			reg, err := lifecycle.OpenRegistry(filepath.Join(state, "registry.db"))
			if err != nil {
				t.Fatal(err)
			}
			recs, err := reg.List()
			if err != nil {
				t.Fatal(err)
			}
			for _, r := range recs {
				if r.Run == run {
					t.Errorf("the killed run's record is still there: %+v", r)
				}
			}
			again.stopClean(t)
			by.assertAlive(t)
		})
	}
}

// Row 5: a registry record whose pid now belongs to a process pyfleet did not
// start (PID reuse, simulated by a fake record of a dead run): that process
// survives the next node's sweep, and the record goes.
func TestOrphansPIDReuse(t *testing.T) {
	url := startTestNATS(t)
	by := startBystanders(t)
	nc := connectURL(t, url)
	ev := watchEvents(t, nc, "default")
	state := shortTempDir(t)

	reused := startSleeper(t)   // holds a recorded pid, with another start time
	rebooted := startSleeper(t) // holds a recorded pid and start time, of another boot
	control := startSleeper(t)  // matches its record: the sweep must kill it
	ghost := fmt.Sprintf("ghost%d", os.Getpid())
	const deadRun = "deadrun"
	rec := func(worker string, id lifecycle.Identity) lifecycle.Record {
		return lifecycle.Record{Node: ghost, Run: deadRun, Worker: worker, Pool: "default",
			PID: id.PID, PGID: id.PID, StartTime: id.StartTime, BootID: id.BootID, State: lifecycle.StateRunning}
	}
	stale := reused
	stale.StartTime++
	otherBoot := rebooted
	otherBoot.BootID = "00000000-0000-0000-0000-000000000000"
	writeRecords(t, filepath.Join(state, "registry.db"), 0o600, rec("w1-1", stale), rec("w2-2", otherBoot), rec("w3-3", control))
	reg, err := lifecycle.OpenRegistry(filepath.Join(state, "registry.db"))
	if err != nil {
		t.Fatal(err)
	}

	n := startNode(t, onNATS(url, nodeOptions{app: nastyApp(), workers: 1, stateDir: state}))
	run := runOf(t, ev, n)
	// The sweep runs before the first worker starts: its events come first.
	ev.waitFor(30*time.Second, func(e lifecycle.Event) bool { return e.Kind == lifecycle.KindReady && e.Run == run })

	for _, id := range []lifecycle.Identity{reused, rebooted} {
		if !id.Alive() {
			t.Errorf("pid %d was killed on a record whose identity does not match it", id.PID)
		}
	}
	assertGone(t, "the process that matched its record", []lifecycle.Identity{control}, 2*time.Second)
	reaped := matching(ev, kind(lifecycle.KindOrphanReaped))
	if len(reaped) != 1 || reaped[0].PID != control.PID || reaped[0].Node != ghost || reaped[0].Run != deadRun {
		t.Errorf("orphan_reaped events %+v, want exactly one, for the control %d of %s/%s", reaped, control.PID, ghost, deadRun)
	}
	recs, err := reg.List()
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range recs {
		if r.Node == ghost {
			t.Errorf("the dead run's record is still there: %+v", r)
		}
	}
	n.stopClean(t)
	by.assertAlive(t)
}

// Row 6: two nodes on one machine and one state dir; kill -9 one. The other's
// workers all survive and serve, and its reaper reaps only what the dead one
// left. In group mode, for the reason TestOrphansSetsidGrandchild gives.
func TestOrphansTwoNodesOneStateDir(t *testing.T) { inBothModes(t, testOrphansTwoNodesOneStateDir) }

func testOrphansTwoNodesOneStateDir(t *testing.T, preload bool) {
	url := startTestNATS(t)
	by := startBystanders(t)
	nc := connectURL(t, url)
	ev := watchEvents(t, nc, "default")
	state := shortTempDir(t)
	base := fmt.Sprintf("t%d-two", os.Getpid())
	group := []string{"--containment", lifecycle.ModeGroup}
	a := startNode(t, onNATS(url, nodeOptions{name: base + "-a", app: nastyApp(), workers: 2, stateDir: state, extra: group, preload: preload}))
	b := startNode(t, onNATS(url, nodeOptions{name: base + "-b", app: nastyApp(), workers: 2, stateDir: state, extra: group, preload: preload}))
	runA := runOf(t, ev, a)

	// Each node gets a child in a worker's group and a setsid grandchild.
	var aSetsid, bSetsid setsidReply
	var aSpawn, bSpawn spawnReply
	callOK(t, nc, nodeSubject(a.name, "setsid_sleep"), `{}`, &aSetsid)
	callOK(t, nc, nodeSubject(a.name, "spawn"), `{}`, &aSpawn)
	callOK(t, nc, nodeSubject(b.name, "setsid_sleep"), `{}`, &bSetsid)
	callOK(t, nc, nodeSubject(b.name, "spawn"), `{}`, &bSpawn)
	workersA := identify(t, a.pythonPIDs(t)...)
	treeA := a.tree(t, aSetsid.Grandchild, aSpawn.Child)
	startedA, groupsA := startedBy(workersA, treeA)
	treeB := b.tree(t, bSetsid.Grandchild, bSpawn.Child)
	workersB := b.pythonPIDs(t)
	if len(treeA) != 4 || len(treeB) != 4 || len(workersB) != 2 {
		t.Fatalf("node a has %v, node b %v (workers %v); want 2 workers, a child and a grandchild each",
			pidsOf(treeA), pidsOf(treeB), workersB)
	}

	// Node a dies with its helpers (its guardian would otherwise kill
	// what its workers started, and leave the survivor nothing to reap).
	a.killNineWithHelpers(t)
	a.wait(10 * time.Second)
	if _, left := waitGone(workersA, 5*time.Second); len(left) > 0 {
		killIdentities(left)
		t.Fatalf("workers of the killed node still running 5 s after its SIGKILL: %v", left)
	}
	// What a's workers started is left for the survivor's reaper, which
	// sweeps the state dir every 10 s; only a worker's lifeline may have
	// killed its own group as the node died.
	leftA := undoomed(startedA)
	if !slices.ContainsFunc(leftA, func(id lifecycle.Identity) bool { return id.PID == aSetsid.Grandchild }) {
		t.Fatalf("the setsid grandchild %d of the killed node died with it; nothing left to test the survivor's reaper with", aSetsid.Grandchild)
	}
	for _, id := range startedA {
		if !slices.Contains(leftA, id) {
			t.Logf("pid %d (in a worker's group: %v) died with node a: its worker's lifeline killed the group", id.PID, groupsA[id.PID])
		}
	}
	for _, id := range leftA {
		e := ev.waitFor(30*time.Second, allOf(kind(lifecycle.KindOrphanReaped), withPID(id.PID)))
		if e.Node != a.name || e.Run != runA {
			t.Errorf("orphan_reaped for %d names %q/%q, want %q/%q", e.PID, e.Node, e.Run, a.name, runA)
		}
	}
	assertGone(t, "the dead node's processes", treeA, time.Second)
	if left := a.processes(); len(left) > 0 {
		t.Errorf("the dead node's processes still running: %v", left)
	}

	// Every process of the survivor is the one it was: same pid, same start time.
	for _, id := range treeB {
		if !id.Alive() {
			t.Errorf("the surviving node lost %v", id)
		}
	}
	seen := map[int]bool{}
	for range 8 {
		var p pidReply
		msg := callOK(t, nc, fnSubject("pid"), `{}`, &p)
		if msg.Header.Get("Pyfleet-Node") != b.name || !slices.Contains(workersB, p.PID) {
			t.Errorf("served by node %q pid %d, want node %s, one of %v", msg.Header.Get("Pyfleet-Node"), p.PID, b.name, workersB)
		}
		seen[p.PID] = true
	}
	for _, e := range matching(ev, kind(lifecycle.KindOrphanReaped)) {
		if e.Node != a.name || slices.Contains(pidsOf(treeB), e.PID) {
			t.Errorf("the reaper killed what is not the dead node's: %+v", e)
		}
	}
	for _, k := range []string{lifecycle.KindCrashed, lifecycle.KindTerminated, lifecycle.KindRestarted} {
		if es := matching(ev, allOf(kind(k), ofNode(b.name))); len(es) > 0 {
			t.Errorf("the surviving node's workers were disturbed: %+v", es)
		}
	}

	b.stopClean(t)
	assertGone(t, "the surviving node's processes after its stop", treeB, time.Second)
	by.assertAlive(t)
}

// Row 7: a worker killed with SIGKILL mid-request: the caller gets 500
// WorkerLost at once, not at its deadline; crashed, then restarted; what
// the worker started goes with it.
func TestOrphansWorkerKilledMidRequest(t *testing.T) {
	inBothModes(t, testOrphansWorkerKilledMidRequest)
}

func testOrphansWorkerKilledMidRequest(t *testing.T, preload bool) {
	by := startBystanders(t)
	n := startNode(t, nodeOptions{preload: preload, app: nastyApp(), workers: 1})
	nc := n.connect()
	ev := watchEvents(t, nc, "default")
	var sp spawnReply
	callOK(t, nc, fnSubject("spawn"), `{}`, &sp)
	var ss setsidReply
	callOK(t, nc, fnSubject("setsid_sleep"), `{}`, &ss)
	tree := n.tree(t, sp.PID, sp.Child, ss.Grandchild)
	worker := identify(t, sp.PID)[0]
	supervised := supervisedOf(t, sp.PID)

	touch := filepath.Join(shortTempDir(t), "busy")
	const deadline = 30 * time.Second
	type answer struct {
		msg *nats.Msg
		err error
		at  time.Time
	}
	answered := make(chan answer, 1)
	go func() {
		msg, err := request(nc, fnSubject("sleep_ms"), fmt.Sprintf(`{"ms":60000,"touch":%q}`, touch), deadline)
		answered <- answer{msg, err, time.Now()}
	}()
	if busy := waitTouch(t, touch, 30*time.Second); busy != worker.PID {
		t.Fatalf("the call runs on %d, want the worker %d", busy, worker.PID)
	}
	killed := time.Now()
	killIdentities([]lifecycle.Identity{worker})

	select {
	case a := <-answered:
		if a.err != nil {
			t.Fatalf("the caller got %v, want an error answer", a.err)
		}
		t.Logf("the caller's answer came %s after the worker's SIGKILL", a.at.Sub(killed).Round(time.Millisecond))
		if code := a.msg.Header.Get("Nats-Service-Error-Code"); code != "500" || !strings.Contains(string(a.msg.Data), "WorkerLost") {
			t.Errorf("answer %v %s, want 500 WorkerLost", a.msg.Header, a.msg.Data)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("no answer 5 s after the worker's SIGKILL (the deadline is %s)", deadline)
	}
	crashed := ev.waitFor(10*time.Second, kind(lifecycle.KindCrashed))
	if crashed.PID != supervised || crashed.Signal != "SIGKILL" {
		t.Errorf("crashed event %+v, want pid %d, SIGKILL", crashed, supervised)
	}
	assertGone(t, "the killed worker's tree", tree, 5*time.Second)
	if e := matching(ev, allOf(kind(lifecycle.KindOrphanReaped), withPID(ss.Grandchild))); len(e) != 1 {
		t.Errorf("want one orphan_reaped for the setsid grandchild %d: %v %+v", ss.Grandchild, ev.kinds(), matching(ev, kind(lifecycle.KindOrphanReaped)))
	}
	restarted := ev.waitFor(30*time.Second, kind(lifecycle.KindRestarted))
	if restarted.Worker != crashed.Worker || restarted.PID == supervised {
		t.Errorf("restarted %+v after crashed %+v", restarted, crashed)
	}
	if firstIndex(ev, kind(lifecycle.KindCrashed)) > firstIndex(ev, kind(lifecycle.KindRestarted)) {
		t.Errorf("restarted before crashed: %v", ev.kinds())
	}
	var p pidReply
	callOK(t, nc, fnSubject("pid"), `{}`, &p)
	if supervisedOf(t, p.PID) != restarted.PID {
		t.Errorf("served by %d, want the replacement %d", p.PID, restarted.PID)
	}
	n.stopClean(t)
	by.assertAlive(t)
}

// Rows 8 and 9 (issue 10): a worker starts a child with a clean environment
// (subprocess.Popen(["sleep", "600"], env={"PATH": "/usr/bin:/bin"})), in its
// process group, or with start_new_session=True as well; then kill -9 of the
// poolnode. The child is gone within 1 s, and a bystander sleep lives, in
// each containment mode this machine offers: in cgroup mode the guardian
// kills the run's cgroup; in group mode it kills the worker's process group.
// The child in a session of its own is group mode's known limit: nothing ties
// it to the run any more.
func TestOrphansCleanEnvironment(t *testing.T) { inBothModes(t, testOrphansCleanEnvironment) }

func testOrphansCleanEnvironment(t *testing.T, preload bool) {
	url := startTestNATS(t)
	by := startBystanders(t)
	for _, mode := range []string{lifecycle.ModeCgroup, lifecycle.ModeGroup} {
		for _, row := range []struct {
			name       string
			newSession bool
		}{
			{"Popen with a clean environment", false},
			{"Popen with a clean environment and start_new_session", true},
		} {
			t.Run(mode+"/"+row.name, func(t *testing.T) {
				if mode == lifecycle.ModeCgroup {
					requireCgroup(t)
				}
				nc := connectURL(t, url)
				ev := watchEvents(t, nc, "default")
				state := shortTempDir(t)
				n := startNode(t, modeNode(url, mode, state, "", 2, preload))
				run := runOf(t, ev, n)
				if mode == lifecycle.ModeCgroup {
					runCgroupOf(t, state, n.name, run)
				}
				_, child := cleanChild(t, n, nc, row.newSession)
				workers := identify(t, n.pythonPIDs(t)...)

				knownLimit := mode == lifecycle.ModeGroup && row.newSession
				bound := 5 * time.Second // generous: the measured time is what counts
				if knownLimit {
					bound = 2 * time.Second
				}
				n.killNine(t)
				took, left := waitGone([]lifecycle.Identity{child}, bound)
				n.wait(10 * time.Second)
				if knownLimit {
					if len(left) == 0 {
						t.Fatalf("group mode: the clean-environment child in a session of its own died %s after the node's SIGKILL; "+
							"the README names it group mode's known limit: update both", took)
					}
					killIdentities(left)
					t.Skipf("known limit of group mode: child %d left its worker's group (start_new_session) and carries no marker "+
						"(a clean environment), so nothing ties it to the run once the node is dead; it was still running %s after "+
						"the node's SIGKILL; cgroup containment covers it", child.PID, took.Round(time.Millisecond))
				}
				if len(left) > 0 {
					killIdentities(left)
					t.Fatalf("the clean-environment child %d still runs %s after the node's SIGKILL", child.PID, bound)
				}
				t.Logf("%s mode: kill -9 of the node to the clean-environment child gone: %s", mode, took.Round(100*time.Microsecond))
				if took > time.Second {
					t.Errorf("the clean-environment child went %s after the node's SIGKILL, want within 1 s", took)
				}
				assertGone(t, "the workers", workers, time.Second)
				// What the guardian killed is published by the next node on
				// the state dir (unless the worker's lifeline, killing its
				// own group as the node died, was first).
				again := startNode(t, modeNode(url, mode, state, n.name, 1, preload))
				run2 := runOf(t, ev, again)
				ev.waitFor(30*time.Second, func(e lifecycle.Event) bool { return e.Kind == lifecycle.KindReady && e.Run == run2 })
				if es := matching(ev, allOf(kind(lifecycle.KindOrphanReaped), withPID(child.PID))); len(es) > 0 {
					t.Logf("orphan_reaped for the child: %s", es[0].Detail)
					if es[0].Run != run {
						t.Errorf("orphan_reaped for %d names run %q, want %q", child.PID, es[0].Run, run)
					}
				} else if ln := filterEvents(n.loggedEvents(), withPID(child.PID)); len(ln) > 0 {
					t.Errorf("the guardian logged killing %d, but the next node did not publish it: %+v", child.PID, ln)
				} else {
					t.Logf("no event for the child: its worker's lifeline killed its group as the node died")
				}
				again.stopClean(t)
				by.assertAlive(t)
			})
		}
	}
}

// Row 10 (issue 10): kill -9 of the node and its guardian at the same
// moment, with a worker's clean-environment child in its group, one in a
// session of its own, and a marked setsid grandchild. In cgroup mode, whose
// workers run in PID namespaces of their own too, all of them are gone
// within 1 s; the next node on the state dir removes the dead run's cgroup.
// In group mode that node's sweep finds the marked grandchild;
// clean-environment children are group mode's known limit.
func TestOrphansKillNodeAndGuardian(t *testing.T) { inBothModes(t, testOrphansKillNodeAndGuardian) }

func testOrphansKillNodeAndGuardian(t *testing.T, preload bool) {
	url := startTestNATS(t)
	by := startBystanders(t)
	for _, mode := range []string{lifecycle.ModeCgroup, lifecycle.ModeGroup} {
		t.Run(mode, func(t *testing.T) {
			if mode == lifecycle.ModeCgroup {
				requireCgroup(t)
			}
			nc := connectURL(t, url)
			ev := watchEvents(t, nc, "default")
			state := shortTempDir(t)
			n := startNode(t, modeNode(url, mode, state, "", 2, preload))
			run := runOf(t, ev, n)
			var cgroupDir string
			if mode == lifecycle.ModeCgroup {
				cgroupDir = runCgroupOf(t, state, n.name, run)
			}
			_, inGroup := cleanChild(t, n, nc, false)
			_, ownSession := cleanChild(t, n, nc, true)
			var ss setsidReply
			callOK(t, nc, nodeSubject(n.name, "setsid_sleep"), `{}`, &ss)
			marked := identify(t, ss.Grandchild)[0]
			clean := []lifecycle.Identity{inGroup, ownSession}

			// In cgroup mode each worker also runs in a PID namespace of
			// its own where the host allows it, as this one must: the
			// namespace dies with its init, and the init with the node.
			namespaced := mode == lifecycle.ModeCgroup
			if sup := n.workerPIDs(); namespaced && (len(sup) == 0 || !isInit(sup[0])) {
				t.Fatalf("cgroup mode: the node supervises %v, want each worker's init", sup)
			}
			at := n.killNineWithHelpers(t)
			n.wait(10 * time.Second)
			all := append(slices.Clone(clean), marked)
			if namespaced {
				took, left := waitGone(all, time.Second)
				if len(left) > 0 {
					killIdentities(left)
					t.Fatalf("cgroup mode: still running 1 s after the node and its guardian were SIGKILLed: %v", left)
				}
				t.Logf("cgroup mode: all of %v gone %s after the kill (waited %s)", pidsOf(all), time.Since(at).Round(time.Millisecond), took.Round(time.Millisecond))
			} else {
				time.Sleep(time.Second)
			}
			survivors := undoomed(all)
			t.Logf("1 s after the node and its guardian were SIGKILLed, still running: %v (marked grandchild %d, clean-environment children %v)",
				pidsOf(survivors), marked.PID, pidsOf(clean))

			start := time.Now()
			again := launchNode(t, modeNode(url, mode, state, n.name, 1, preload))
			var want []lifecycle.Identity
			if mode == lifecycle.ModeCgroup {
				want = append(slices.Clone(clean), marked)
			} else {
				want = []lifecycle.Identity{marked}
			}
			took, left := waitGone(want, 60*time.Second)
			if len(left) > 0 {
				killIdentities(left)
				t.Fatalf("%s mode: still running after the next node started on the state dir: %v", mode, left)
			}
			t.Logf("%s mode: next node's start to the last of %v gone: %s", mode, pidsOf(want), took.Round(time.Millisecond))
			select {
			case <-again.serving:
			case <-again.done:
				t.Fatalf("the next node exited: %v\n%s", again.err, again.log())
			case <-time.After(60 * time.Second):
				t.Fatalf("the next node is not serving after 60 s\n%s", again.log())
			}
			t.Logf("%s mode: next node's start to serving: %s", mode, time.Since(start).Round(time.Millisecond))
			for _, id := range want {
				if !slices.Contains(survivors, id) {
					continue
				}
				es := matching(ev, allOf(kind(lifecycle.KindOrphanReaped), withPID(id.PID)))
				if len(es) == 0 || es[0].Run != run {
					t.Errorf("no orphan_reaped naming run %s for %d, which the next node's sweep killed: %+v", run, id.PID, es)
				} else {
					t.Logf("orphan_reaped for %d: %s", id.PID, es[0].Detail)
				}
			}
			if mode == lifecycle.ModeCgroup {
				if _, err := os.Stat(cgroupDir); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("the dead run's cgroup %s is still there: %v", cgroupDir, err)
				}
				if _, err := os.Stat(filepath.Join(state, "nodes", n.name+"."+run+".cgroup")); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("the dead run's cgroup record is still there: %v", err)
				}
			}
			again.stopClean(t)
			by.assertAlive(t)

			if mode != lifecycle.ModeGroup {
				return // the clean-environment children were checked above
			}
			t.Run("clean-environment children", func(t *testing.T) {
				left := undoomed(clean)
				if len(left) == 0 {
					t.Fatalf("group mode: both clean-environment children died although the node and its guardian were SIGKILLed; " +
						"the README names them group mode's known limit: update both")
				}
				killIdentities(left)
				t.Skipf("known limit of group mode: with the node and its guardian SIGKILLed together, clean-environment children "+
					"(no marker) are not found by the next node's sweep; %v were still running (a child in its worker's group "+
					"dies only if the worker's lifeline wins its race with the parent-death signal)", pidsOf(left))
			})
		})
	}
}
