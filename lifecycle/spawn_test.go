package lifecycle

import (
	"errors"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestStopKillsWholeGroup(t *testing.T) {
	s := mustSpawner(t)
	p, out := mustStart(t, s, "tree")
	waitFor(t, "three announced pids", 5*time.Second, func() bool { return len(out.pids("pid")) == 3 })
	ids := identities(out.pids("pid"))
	if len(ids) != 3 {
		t.Fatalf("identities %v", ids)
	}
	if p.PGID() != p.PID() {
		t.Errorf("PGID %d, want the leader's pid %d", p.PGID(), p.PID())
	}

	start := time.Now()
	p.Stop(10 * time.Second)
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Stop took %v for children that honour SIGTERM", d)
	}
	if got := p.Exit(); got != (ExitStatus{Code: -1, Signal: "SIGTERM"}) {
		t.Errorf("Exit = %v, want signal SIGTERM", got)
	}
	for _, id := range ids {
		if id.Alive() {
			t.Errorf("%v survived Stop", id)
		}
	}
}

func TestStopEscalatesToSIGKILL(t *testing.T) {
	s := mustSpawner(t)
	p, out := mustStart(t, s, "tree-ignore")
	waitFor(t, "three announced pids", 5*time.Second, func() bool { return len(out.pids("pid")) == 3 })
	ids := identities(out.pids("pid"))

	const grace = 300 * time.Millisecond
	start := time.Now()
	p.Stop(grace)
	if d := time.Since(start); d < grace {
		t.Errorf("Stop returned after %v, before the grace of %v", d, grace)
	}
	if got := p.Exit(); got != (ExitStatus{Code: -1, Signal: "SIGKILL"}) {
		t.Errorf("Exit = %v, want signal SIGKILL", got)
	}
	for _, id := range ids {
		if id.Alive() {
			t.Errorf("%v ignored SIGTERM and survived Stop", id)
		}
	}
}

func TestGroupDiesWithLeader(t *testing.T) {
	// The leader is killed from outside; nobody calls Stop. Its group must
	// still be gone by Done.
	s := mustSpawner(t)
	p, out := mustStart(t, s, "tree")
	waitFor(t, "three announced pids", 5*time.Second, func() bool { return len(out.pids("pid")) == 3 })
	ids := identities(out.pids("pid"))
	if err := p.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	waitDone(t, p, 5*time.Second)
	for _, id := range ids {
		if id.Alive() {
			t.Errorf("%v outlived its group leader", id)
		}
	}
}

func TestExitCode(t *testing.T) {
	s := mustSpawner(t)
	p, _ := mustStart(t, s, "exit7")
	waitDone(t, p, 5*time.Second)
	if got := p.Exit(); got != (ExitStatus{Code: 7}) {
		t.Errorf("Exit = %v, want exit status 7", got)
	}
	start := time.Now()
	p.Stop(time.Hour) // after Done: returns at once
	if d := time.Since(start); d > time.Second {
		t.Errorf("Stop of an exited process took %v", d)
	}
	if p.Identity().Alive() {
		t.Error("identity of an exited process is alive")
	}
}

func TestKillReportsSignal(t *testing.T) {
	s := mustSpawner(t)
	p, out := mustStart(t, s, "sleep")
	waitFor(t, "ready", 5*time.Second, func() bool { return len(out.pids("pid")) == 1 })
	if !p.Identity().Alive() {
		t.Fatal("identity of a running process is not alive")
	}
	p.Kill()
	if got := p.Exit(); got != (ExitStatus{Code: -1, Signal: "SIGKILL"}) {
		t.Errorf("Exit = %v, want signal SIGKILL", got)
	}
	if p.Identity().Alive() {
		t.Error("identity alive after Kill")
	}
}

func TestStopConcurrentAndRepeated(t *testing.T) {
	s := mustSpawner(t)
	p, out := mustStart(t, s, "ignore-term")
	waitFor(t, "ready", 5*time.Second, func() bool { return len(out.pids("pid")) == 1 })

	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() { p.Stop(time.Hour) })
	}
	// A Kill while the Stops wait out their grace escalates them all.
	time.Sleep(100 * time.Millisecond)
	start := time.Now()
	p.Kill()
	wg.Wait()
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Stops returned %v after Kill", d)
	}
	p.Stop(time.Second)
	p.Kill()
	if got := p.Exit(); got.Signal != "SIGKILL" {
		t.Errorf("Exit = %v, want signal SIGKILL", got)
	}
}

func TestOutputLines(t *testing.T) {
	s := mustSpawner(t)
	var stdout, stderr lines
	p, err := Start(s, helperCmd("lines"), StartOptions{Stdout: stdout.add, Stderr: stderr.add})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill()
	waitDone(t, p, 5*time.Second)
	want := []string{"out 1", "out 2", strings.Repeat("x", maxLine), strings.Repeat("x", 10), "no newline"}
	if got := stdout.get(); !slices.Equal(got, want) {
		t.Errorf("stdout lines (lengths) = %v, want %v", lengths(got), lengths(want))
	}
	if got := stderr.get(); !slices.Equal(got, []string{"err 1"}) {
		t.Errorf("stderr lines = %q", got)
	}
	if got := p.Exit(); got != (ExitStatus{}) {
		t.Errorf("Exit = %v, want exit status 0", got)
	}
}

func lengths(ss []string) []int {
	var n []int
	for _, s := range ss {
		n = append(n, len(s))
	}
	return n
}

func TestNilCallbacksDiscard(t *testing.T) {
	s := mustSpawner(t)
	p, err := Start(s, helperCmd("lines"), StartOptions{})
	if err != nil {
		t.Fatal(err)
	}
	waitDone(t, p, 5*time.Second)
}

func TestReadersStopWhenEscapeeHoldsPipes(t *testing.T) {
	s := mustSpawner(t)
	p, out := mustStart(t, s, "escape")
	waitFor(t, "two announced pids", 5*time.Second, func() bool { return len(out.pids("pid")) == 2 })
	start := time.Now()
	p.Kill()
	d := time.Since(start)
	if d < drainTimeout/2 || d > drainTimeout+3*time.Second {
		t.Errorf("Kill returned after %v; want about the drain timeout %v", d, drainTimeout)
	}
	// The setsid child left the group: Stop alone cannot reach it (the
	// marker scan does); the cleanup kills it by identity.
}

func TestStartErrors(t *testing.T) {
	s := NewSpawner()
	cmd := helperCmd("sleep")
	cmd.Stdout = os.Stdout
	if _, err := Start(s, cmd, StartOptions{}); !errors.Is(err, ErrBadCommand) {
		t.Errorf("Start with Stdout set: %v, want ErrBadCommand", err)
	}
	if _, err := Start(s, exec.Command("/nonexistent/python"), StartOptions{}); err == nil {
		t.Error("Start of a missing binary succeeded")
	}
	s.Close()
	s.Close()
	if _, err := Start(s, helperCmd("sleep"), StartOptions{}); !errors.Is(err, ErrSpawnerClosed) {
		t.Errorf("Start after Close: %v, want ErrSpawnerClosed", err)
	}
}

func TestPdeathsigSurvivesThreadChurn(t *testing.T) {
	s := mustSpawner(t)
	p, out := mustStart(t, s, "sleep")
	waitFor(t, "ready", 5*time.Second, func() bool { return len(out.pids("pid")) == 1 })

	// Goroutines that exit while locked make the runtime end their
	// threads; a child forked from one of them would get its Pdeathsig.
	for range 5 {
		var wg sync.WaitGroup
		for range 50 {
			wg.Go(func() { runtime.LockOSThread() })
		}
		wg.Wait()
		runtime.GC()
	}
	time.Sleep(200 * time.Millisecond)
	select {
	case <-p.Done():
		t.Fatalf("child died with the thread churn: %v", p.Exit())
	default:
	}
	if !p.Identity().Alive() {
		t.Fatal("child not alive after thread churn")
	}
}

func TestWorkerDiesWithNode(t *testing.T) {
	s := mustSpawner(t)
	node, out := mustStart(t, s, "node")
	waitFor(t, "worker pid", 5*time.Second, func() bool { return len(out.pids("worker")) == 1 })
	ids := identities(out.pids("worker"))
	if len(ids) != 1 {
		t.Fatal("worker gone before the node died")
	}
	// The worker is in a group of its own: only its Pdeathsig can kill it.
	node.Kill()
	waitFor(t, "worker to die with its node", time.Second, func() bool { return !ids[0].Alive() })
}

func TestTreeRSS(t *testing.T) {
	s := mustSpawner(t)
	p, out := mustStart(t, s, "tree")
	waitFor(t, "three announced pids", 5*time.Second, func() bool { return len(out.pids("pid")) == 3 })
	leader, err := readRSS(p.PID())
	if err != nil {
		t.Fatal(err)
	}
	tree, err := TreeRSS(p.PID())
	if err != nil {
		t.Fatal(err)
	}
	if tree <= leader {
		t.Errorf("TreeRSS = %d, not more than the leader's own %d", tree, leader)
	}
	if of, err := TreeRSSOf([]int{p.PID(), 1 << 30}); err != nil || len(of) != 1 || of[p.PID()] == 0 {
		t.Errorf("TreeRSSOf = %v, %v; want only the live root", of, err)
	}
	p.Kill()
	if _, err := TreeRSS(p.PID()); !errors.Is(err, ErrNoProcess) {
		t.Errorf("TreeRSS of a reaped pid: %v, want ErrNoProcess", err)
	}
}
