package test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/lifecycle"
)

// stressLong reports whether the long forms run (`make stress`).
func stressLong() bool { return os.Getenv("PYFLEET_STRESS") == "1" }

// Row 8: rounds of start a node (4 workers), load it with calls that leave
// children of every kind, kill -9 it at a random moment, and check that
// nothing it started is left: its workers die with it; whatever else is
// still running 1 s after the kill is counted (none, normally, when only the
// node was killed: its guardian acts on its death), and is gone once a node
// has started again on the state dir, which reaps and reports each leftover
// with an orphan_reaped event. Bystanders survive every round. Every third round
// kills the node while it is still starting (0-1.5 s after its launch),
// every second one kills its helpers with it. The node started again is then
// stopped cleanly. CI runs 3 rounds; PYFLEET_STRESS=1 runs 200.
// PYFLEET_STRESS_ROUNDS sets another number of rounds; PYFLEET_STRESS_SEED
// replays a run's random choices.
func TestStressKillRestart(t *testing.T) {
	rounds := 3
	if stressLong() {
		rounds = 200
	}
	if s := os.Getenv("PYFLEET_STRESS_ROUNDS"); s != "" {
		var err error
		if rounds, err = strconv.Atoi(s); err != nil {
			t.Fatalf("PYFLEET_STRESS_ROUNDS=%q: %v", s, err)
		}
	}
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("PYFLEET_STRESS_SEED"); s != "" {
		var err error
		if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
			t.Fatalf("PYFLEET_STRESS_SEED=%q: %v", s, err)
		}
	}
	t.Logf("%d rounds, PYFLEET_STRESS_SEED=%d", rounds, seed)
	rng := rand.New(rand.NewPCG(seed, seed>>1|1))

	url := startTestNATS(t)
	by := startBystanders(t)
	nc := connectURL(t, url)
	ev := watchEvents(t, nc, "default")
	state := shortTempDir(t)

	var st stressStats
	start := time.Now()
	for i := range rounds {
		r := stressRound{
			i:        i,
			url:      url,
			nc:       nc,
			ev:       ev,
			state:    state,
			delay:    time.Duration(rng.IntN(301)) * time.Millisecond,
			starting: i%3 == 2,
			helpers:  i%2 == 1,
			stats:    &st,
		}
		if r.starting {
			// Anywhere in the start: lock, sweep, guardian, spawns.
			r.delay = time.Duration(rng.IntN(1501)) * time.Millisecond
		}
		if !t.Run(fmt.Sprintf("round %d", i), r.run) {
			break
		}
		by.assertAlive(t)
		if t.Failed() {
			break
		}
	}
	t.Logf("%d rounds in %s, %d of them killed while starting; processes still running 1 s after the kill, all reaped by the next node: "+
		"%d in %d rounds that killed the node alone, %d in %d rounds that killed its helpers too; the slowest last worker went %s after the kill",
		st.rounds, time.Since(start).Round(time.Second), st.starting, st.leftProcs[0], st.leftRounds[0], st.leftProcs[1], st.leftRounds[1],
		time.Duration(st.slowestWorkers.Load()).Round(100*time.Microsecond))
}

type stressStats struct {
	rounds, starting      int
	leftRounds, leftProcs [2]int // node alone, node and helpers
	slowestWorkers        atomic.Int64
}

type stressRound struct {
	i        int
	url      string
	nc       *nats.Conn
	ev       *events
	state    string
	delay    time.Duration // from the start of the load (or of the node) to the kill
	starting bool          // kill while the node starts
	helpers  bool          // kill the node's helpers with it
	stats    *stressStats
}

// stressCalls are the calls of the load: each leaves processes of one kind.
var stressCalls = []struct{ fn, body string }{
	{"spawn", `{}`},                             // a subprocess child in the worker's group
	{"mp_tree", `{}`},                           // a multiprocessing child and grandchild
	{"setsid_sleep", `{"how":"sh"}`},            // a grandchild in a session of its own
	{"setsid_sleep", `{"how":"fork"}`},          // a double-forked daemon
	{"sleep_ms", `{"ms":50}`},                   // a call in flight
	{"pid", `{}`},                               // a quick one
	{"spawn", `{"seconds":0.2}`},                // a child that exits by itself
	{"mp_tree", `{"seconds":0.1,"hold_ms":10}`}, // a tree that exits by itself
}

func (r stressRound) run(t *testing.T) {
	name := fmt.Sprintf("s%d-%d", os.Getpid(), r.i)
	o := onNATS(r.url, nodeOptions{name: name, app: nastyApp(), workers: 4, stateDir: r.state})
	var n *nodeProc
	stop := make(chan struct{})
	var load sync.WaitGroup
	if r.starting {
		n = launchNode(t, o)
		time.Sleep(r.delay)
	} else {
		n = startNode(t, o)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		go func() {
			<-stop
			cancel() // calls the dead node will never answer
		}()
		for g := range 4 {
			load.Go(func() {
				for k := g; ctx.Err() == nil; k++ {
					c := stressCalls[(k*7+r.i)%len(stressCalls)]
					msg := nats.NewMsg(fnSubject(c.fn))
					msg.Data = []byte(c.body)
					msg.Header.Set("Pyfleet-Timeout", "5000")
					_, _ = r.nc.RequestMsgWithContext(ctx, msg)
				}
			})
		}
		time.Sleep(r.delay)
	}

	workers := aliveWorkers(n)
	var killed time.Time
	if r.helpers {
		killed = n.killNineWithHelpers(t)
	} else {
		killed = n.killNine(t)
	}
	// The workers die with the node (parent-death signal).
	_, left := waitGone(workers, 5*time.Second)
	took := time.Since(killed)
	close(stop)
	load.Wait()
	n.wait(30 * time.Second)
	if len(left) > 0 {
		killIdentities(left)
		t.Fatalf("workers still running 5 s after the node's SIGKILL: %v", left)
	}
	for {
		old := r.stats.slowestWorkers.Load()
		if int64(took) <= old || r.stats.slowestWorkers.CompareAndSwap(old, int64(took)) {
			break
		}
	}

	// What the workers started: gone within 1 s of the node's death if its
	// guardian lived, else left for the next node.
	leftovers := n.processes()
	for deadline := killed.Add(time.Second); len(leftovers) > 0 && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
		leftovers = n.processes()
	}
	r.stats.rounds++
	if r.starting {
		r.stats.starting++
	}
	if len(leftovers) > 0 {
		h := 0
		if r.helpers {
			h = 1
		}
		r.stats.leftRounds[h]++
		r.stats.leftProcs[h] += len(leftovers)
		t.Logf("1 s after the kill, still running: %s", describe(leftovers))
	}
	t.Logf("kill -9 %s after the %s (helpers too: %v): %d workers gone in %s; %d processes left after 1 s",
		r.delay, map[bool]string{true: "start", false: "load"}[r.starting], r.helpers, len(workers),
		took.Round(100*time.Microsecond), len(leftovers))

	// The next node on the state dir reaps the rest before it serves, and
	// says so.
	var mustReport []lifecycle.Identity // cannot end by themselves: a sleep with no kill on its way
	for _, id := range undoomed(leftovers) {
		if comm(id.PID) == "sleep" {
			mustReport = append(mustReport, id)
		}
	}
	phase := time.Now()
	again := startNode(t, onNATS(r.url, nodeOptions{name: name + "b", app: nastyApp(), workers: 1, stateDir: r.state}))
	assertGone(t, "once a node started again on the state dir", leftovers, time.Second)
	if left := n.processes(); len(left) > 0 {
		killIdentities(left)
		t.Errorf("still running once a node started again on the state dir: %s", describe(left))
	}
	run2 := runOf(t, r.ev, again)
	r.ev.waitFor(30*time.Second, func(e lifecycle.Event) bool { return e.Kind == lifecycle.KindReady && e.Run == run2 })
	for _, id := range mustReport {
		if es := matching(r.ev, allOf(kind(lifecycle.KindOrphanReaped), withPID(id.PID), ofNode(name))); len(es) == 0 {
			t.Errorf("leftover %v was reaped without an orphan_reaped event naming it and node %s", id, name)
		}
	}
	started := time.Since(phase)
	again.stopClean(t)
	t.Logf("restart took %s, its stop %s", started.Round(time.Millisecond), (time.Since(phase) - started).Round(time.Millisecond))
}

// aliveWorkers names the node's worker processes now.
func aliveWorkers(n *nodeProc) []lifecycle.Identity {
	var ids []lifecycle.Identity
	for _, pid := range n.workerPIDs() {
		if id, err := lifecycle.ReadIdentity(pid); err == nil {
			ids = append(ids, id)
		}
	}
	return ids
}

// comm is a process's command name, or "" once it is gone.
func comm(pid int) string {
	b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/comm")
	return strings.TrimSpace(string(b))
}

// describe lists processes with their command lines, for failure messages.
func describe(ids []lifecycle.Identity) string {
	var b strings.Builder
	for _, id := range ids {
		cmd, _ := os.ReadFile("/proc/" + strconv.Itoa(id.PID) + "/cmdline")
		pi, _ := readProcInfo(id.PID)
		fmt.Fprintf(&b, "\n  pid %d (ppid %d, pgrp %d, sid %d): %s", id.PID, pi.ppid, pi.pgrp, pi.sid,
			strings.ReplaceAll(strings.TrimRight(string(cmd), "\x00"), "\x00", " "))
	}
	return b.String()
}

// TestKillNineTimeToLastProcess measures the time from kill -9 of a node to
// the last of its processes gone, for 8 workers (and 100 workers with
// PYFLEET_STRESS=1), and logs it.
func TestKillNineTimeToLastProcess(t *testing.T) {
	sizes := []int{8}
	if stressLong() {
		sizes = append(sizes, 100)
	}
	by := startBystanders(t)
	for _, workers := range sizes {
		t.Run(fmt.Sprintf("%d workers", workers), func(t *testing.T) {
			reps := 3
			if workers > 8 {
				reps = 1
			}
			var times []time.Duration
			for range reps {
				times = append(times, killNineOnce(t, workers))
			}
			slices.Sort(times)
			t.Logf("kill -9 of a node with %d workers to its last process gone: median %s (min %s, max %s, %d runs)",
				workers, times[len(times)/2].Round(100*time.Microsecond), times[0].Round(100*time.Microsecond),
				times[len(times)-1].Round(100*time.Microsecond), len(times))
		})
	}
	by.assertAlive(t)
}

// killNineOnce starts a node with that many workers, kills it with SIGKILL
// and returns how long its processes took to go.
func killNineOnce(t *testing.T, workers int) time.Duration {
	t.Helper()
	n := launchNode(t, nodeOptions{app: nastyApp(), workers: workers, stateDir: shortTempDir(t)})
	select {
	case <-n.serving:
	case <-n.done:
		t.Fatalf("poolnode exited before serving: %v", n.err)
	case <-time.After(10 * time.Minute):
		t.Fatalf("%d workers not ready after 10 minutes", workers)
	}
	ids := n.processes() // the workers' inits too, where they have them
	if got := len(n.userProcesses()); got != workers {
		t.Fatalf("the node has %d processes, want its %d workers", got, workers)
	}
	killed := n.killNine(t)
	_, left := waitGone(ids, 30*time.Second)
	took := time.Since(killed)
	if len(left) > 0 {
		killIdentities(left)
		t.Fatalf("still running 30 s after the node's SIGKILL: %v", left)
	}
	n.wait(30 * time.Second)
	if left := n.processes(); len(left) > 0 {
		t.Errorf("processes of the node still running: %v", left)
	}
	t.Logf("%d workers: the last gone %s after kill -9", workers, took.Round(100*time.Microsecond))
	return took
}
