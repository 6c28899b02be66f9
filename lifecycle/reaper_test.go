package lifecycle

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
)

// eventLog collects events.
type eventLog struct {
	mu     sync.Mutex
	events []Event
}

func (l *eventLog) add(ev Event) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.events = append(l.events, ev)
}

func (l *eventLog) get() []Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.events)
}

func (l *eventLog) pids() []int {
	var pids []int
	for _, ev := range l.get() {
		pids = append(pids, ev.PID)
	}
	slices.Sort(pids)
	return pids
}

// uniqueRun returns a run name no other test (or test binary) uses.
func uniqueRun(t *testing.T) string {
	return "r" + strconv.Itoa(os.Getpid()) + "x" + strconv.FormatInt(time.Now().UnixNano(), 36)
}

// mustRegistry opens a registry in dir.
func mustRegistry(t *testing.T, dir string) *Registry {
	t.Helper()
	reg, err := OpenRegistry(filepath.Join(dir, "registry.db"))
	if err != nil {
		t.Fatal(err)
	}
	return reg
}

func mustReaper(t *testing.T, dir string, reg *Registry, events *eventLog) *Reaper {
	t.Helper()
	r, err := NewReaper(ReaperConfig{StateDir: dir, Registry: reg, Events: events.add, Logger: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// markedPids returns the live processes carrying the marker of run m, by
// identity.
func markedPids(t *testing.T, m Marker) []Identity {
	t.Helper()
	procs, err := scanMarked()
	if err != nil {
		t.Fatal(err)
	}
	var pids []int
	for _, p := range procs {
		if p.marks.run == m.RunValue() {
			pids = append(pids, p.pid)
		}
	}
	return identities(pids)
}

// startFakeNode runs a fake node (see fakeNode) on dir and returns it once
// its worker, the worker's children and its escapee all run. Whatever the
// test does, they are all killed at its end.
func startFakeNode(t *testing.T, s *Spawner, dir string, m Marker) (*Process, []Identity) {
	t.Helper()
	cmd := helperCmd("fakenode")
	cmd.Env = append(cmd.Env, "FAKENODE_STATE="+dir, "FAKENODE_NODE="+m.Node, "FAKENODE_RUN="+m.Run)
	out := &lines{}
	p, err := Start(s, cmd, StartOptions{Stdout: out.add, Stderr: out.add})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.Kill()
		if _, err := KillMarked(Marker{Node: m.Node, Run: m.Run}, nil); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	waitFor(t, "fake node ready", 5*time.Second, func() bool { return slices.Contains(out.get(), "ready") })
	// The processes are named by what they announce, not found by their
	// marker: a Go process's first os.StartProcess clones a short-lived
	// child of its own (the runtime's pidfd check), which carries the
	// marker too, and a scan at that moment would count it.
	var ids []Identity
	waitFor(t, "four announced processes", 5*time.Second, func() bool { return len(out.pids("pid")) == 4 })
	ids = identities(out.pids("pid"))
	if marked := markedPids(t, m); len(marked) != 4 {
		t.Fatalf("marked processes %v, want the four announced %v", marked, ids)
	}
	return p, ids
}

func TestReaperReapsDeadNode(t *testing.T) {
	dir := t.TempDir()
	s := mustSpawner(t)
	m := Marker{Node: "dead", Run: uniqueRun(t)}
	node, ids := startFakeNode(t, s, dir, m)
	reg := mustRegistry(t, dir)
	recs, err := reg.List()
	if err != nil || len(recs) != 1 || recs[0].PID == 0 {
		t.Fatalf("records of the fake node: %+v, %v", recs, err)
	}
	worker := recs[0]

	node.Kill()
	if NodeAlive(dir, m.Node, m.Run) {
		t.Fatal("killed node still alive")
	}
	for _, id := range ids {
		if !id.Alive() {
			t.Fatalf("%v died with the node; the test needs it to outlive it", id)
		}
	}

	var events eventLog
	if err := mustReaper(t, dir, reg, &events).Sweep(); err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		if id.Alive() {
			t.Errorf("%v survived the sweep", id)
		}
	}
	var want []int
	for _, id := range ids {
		want = append(want, id.PID)
	}
	slices.Sort(want)
	if got := events.pids(); !slices.Equal(got, want) {
		t.Errorf("orphan_reaped pids %v, want %v", got, want)
	}
	for _, ev := range events.get() {
		if ev.Kind != KindOrphanReaped || ev.Node != m.Node || ev.Run != m.Run || ev.TS.IsZero() {
			t.Errorf("event %+v", ev)
		}
		if ev.PID == worker.PID && (ev.Worker != "w1" || ev.Pool != "p" || ev.PGID != worker.PID) {
			t.Errorf("event for the recorded worker: %+v", ev)
		}
	}
	if recs, _ := reg.List(); len(recs) != 0 {
		t.Errorf("records left after the sweep: %+v", recs)
	}
	// Something was found, so the tombstone stays for one more pass.
	if _, err := os.Stat(lockPath(dir, m.Node, m.Run)); err != nil {
		t.Errorf("tombstone: %v", err)
	}
	if err := mustReaper(t, dir, reg, &events).Sweep(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(lockPath(dir, m.Node, m.Run)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("tombstone after a clean pass: %v", err)
	}
	if n := len(events.get()); n != len(ids) {
		t.Errorf("%d events after the second pass, want %d", n, len(ids))
	}
}

func TestReaperLeavesLiveNodeAlone(t *testing.T) {
	dir := t.TempDir()
	s := mustSpawner(t)
	m := Marker{Node: "live", Run: uniqueRun(t)}
	_, ids := startFakeNode(t, s, dir, m)
	if !NodeAlive(dir, m.Node, m.Run) {
		t.Fatal("fake node not alive")
	}
	reg := mustRegistry(t, dir)
	var events eventLog
	r := mustReaper(t, dir, reg, &events)
	for range 2 {
		if err := r.Sweep(); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range ids {
		if !id.Alive() {
			t.Errorf("%v of a live node was killed", id)
		}
	}
	if ev := events.get(); len(ev) != 0 {
		t.Errorf("events for a live node: %+v", ev)
	}
	if recs, _ := reg.List(); len(recs) != 1 {
		t.Errorf("records of a live node: %+v", recs)
	}
}

func TestReaperNeverKillsReusedPID(t *testing.T) {
	dir := t.TempDir()
	reg := mustRegistry(t, dir)
	// An unrelated process (no marker) holds the pid a dead run recorded,
	// with another start time: pid reuse.
	s := mustSpawner(t)
	p, out := mustStart(t, s, "sleep")
	waitFor(t, "ready", 5*time.Second, func() bool { return len(out.pids("pid")) == 1 })
	id := p.Identity()
	run := uniqueRun(t)
	stale := Record{Node: "gone", Run: run, Worker: "w1", PID: id.PID, PGID: id.PID, StartTime: id.StartTime - 1, BootID: id.BootID, State: StateRunning}
	otherBoot := Record{Node: "gone", Run: run, Worker: "w2", PID: id.PID, PGID: id.PID, StartTime: id.StartTime, BootID: "another-boot", State: StateRunning}
	// Written by a node that is gone, and no lock file: a dead run.
	dead := deadIdentity(t)
	for _, rec := range []Record{stale, otherBoot} {
		rec.NodePID, rec.NodeStartTime, rec.NodeBootID = dead.PID, dead.StartTime, dead.BootID
		putRaw(t, reg, rec)
	}
	var events eventLog
	if err := mustReaper(t, dir, reg, &events).Sweep(); err != nil {
		t.Fatal(err)
	}
	if !id.Alive() {
		t.Fatal("the sweep killed a process that reused a recorded pid")
	}
	if ev := events.get(); len(ev) != 0 {
		t.Errorf("events: %+v", ev)
	}
	if recs, _ := reg.List(); len(recs) != 0 {
		t.Errorf("stale records kept: %+v", recs)
	}
}

func TestReaperIgnoresMarkersOfUnknownRuns(t *testing.T) {
	// A process marked by a run this state dir never saw may belong to a
	// node on another state dir: untouchable, even though no lock proves
	// that run alive here.
	dir := t.TempDir()
	m := Marker{Node: "elsewhere", Run: uniqueRun(t), Worker: "w1"}
	cmd := helperCmd("sleep")
	cmd.Env = append(cmd.Env, m.Env()...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	var ids []Identity
	waitFor(t, "marked process", 5*time.Second, func() bool { ids = markedPids(t, m); return len(ids) == 1 })

	var events eventLog
	if err := mustReaper(t, dir, mustRegistry(t, dir), &events).Sweep(); err != nil {
		t.Fatal(err)
	}
	if !ids[0].Alive() || len(events.get()) != 0 {
		t.Errorf("process of an unknown run: alive %v, events %+v", ids[0].Alive(), events.get())
	}
}

func TestReaperDropsStaleRecordsOfLiveRun(t *testing.T) {
	dir := t.TempDir()
	run := uniqueRun(t)
	lock, err := AcquireNodeLock(dir, "me", run)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Release()
	reg := mustRegistry(t, dir)

	// An exited child: its record is stale.
	cmd := helperCmd("exit7")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited, err := ReadIdentity(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	self, _ := ReadIdentity(os.Getpid())
	recs := []Record{
		{Node: "me", Run: run, Worker: "starting", State: StateStarting},
		{Node: "me", Run: run, Worker: "running", PID: self.PID, StartTime: self.StartTime, BootID: self.BootID, State: StateRunning},
		{Node: "me", Run: run, Worker: "exited", PID: exited.PID, StartTime: exited.StartTime, BootID: exited.BootID, State: StateRunning},
	}
	for _, rec := range recs {
		if err := reg.Put(rec); err != nil {
			t.Fatal(err)
		}
	}
	var events eventLog
	if err := mustReaper(t, dir, reg, &events).Sweep(); err != nil {
		t.Fatal(err)
	}
	got, err := reg.List()
	if err != nil {
		t.Fatal(err)
	}
	// List orders by key: node, run, worker.
	want := []Record{stamped(t, recs[1]), stamped(t, recs[0])}
	if !slices.Equal(got, want) {
		t.Errorf("records after the sweep: %+v, want %+v", got, want)
	}
	if len(events.get()) != 0 {
		t.Errorf("events: %+v", events.get())
	}
}

func TestKillMarkedFindsSetsidEscapee(t *testing.T) {
	m := Marker{Node: "n", Run: uniqueRun(t), Worker: "w1"}
	cmd := helperCmd("escape")
	cmd.Env = append(cmd.Env, m.Env()...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_, _ = KillMarked(m, nil)
		_ = cmd.Wait()
	})
	var ids []Identity
	waitFor(t, "worker and escapee", 5*time.Second, func() bool { ids = markedPids(t, m); return len(ids) == 2 })

	// Another worker of the same run is not this worker.
	other := Marker{Node: m.Node, Run: m.Run, Worker: "w2"}
	if n, err := KillMarked(other, nil); n != 0 || err != nil {
		t.Fatalf("KillMarked(other worker) = %d, %v", n, err)
	}
	var events eventLog
	n, err := KillMarked(m, events.add)
	if err != nil || n != 2 {
		t.Fatalf("KillMarked = %d, %v; want 2", n, err)
	}
	for _, id := range ids {
		if id.Alive() {
			t.Errorf("%v survived KillMarked", id)
		}
	}
	for _, ev := range events.get() {
		if ev.Kind != KindOrphanReaped || ev.Worker != "w1" || ev.Run != m.Run {
			t.Errorf("event %+v", ev)
		}
	}
	if _, err := KillMarked(Marker{Node: "n"}, nil); !errors.Is(err, ErrInvalidName) {
		t.Errorf("KillMarked without a run: %v", err)
	}
}

func TestMarkedEscapeeDiesWithWorker(t *testing.T) {
	s := mustSpawner(t)
	m := Marker{Node: "n", Run: uniqueRun(t), Worker: "w1"}
	var events eventLog
	out := &lines{}
	p, err := Start(s, helperCmd("escape"), StartOptions{Stdout: out.add, Marker: m, Events: events.add})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.Kill()
		_, _ = KillMarked(m, nil)
	})
	waitFor(t, "two announced pids", 5*time.Second, func() bool { return len(out.pids("pid")) == 2 })
	ids := identities(out.pids("pid"))

	start := time.Now()
	p.Kill()
	// The escapee holds the output pipes; killed by its marker, it lets the
	// readers finish at once instead of after the drain timeout.
	if d := time.Since(start); d >= drainTimeout {
		t.Errorf("Kill took %v", d)
	}
	for _, id := range ids {
		if id.Alive() {
			t.Errorf("%v outlived its marked worker", id)
		}
	}
	if got := events.pids(); len(got) != 1 || got[0] != ids[1].PID {
		t.Errorf("orphan_reaped for %v, want the escapee %d", got, ids[1].PID)
	}
}

func TestStartMarkerValidation(t *testing.T) {
	s := mustSpawner(t)
	_, err := Start(s, helperCmd("sleep"), StartOptions{Marker: Marker{Node: "a.b", Run: "r", Worker: "w"}})
	if !errors.Is(err, ErrInvalidName) {
		t.Errorf("Start with a dotted node name: %v", err)
	}
}

func TestReapAdopted(t *testing.T) {
	if err := SetChildSubreaper(); err != nil {
		t.Skip("no child subreaper here:", err)
	}
	s := mustSpawner(t)
	// Zombies other tests left behind since this process became a subreaper.
	if _, err := s.ReapAdopted(nil); err != nil {
		t.Fatal(err)
	}
	var events eventLog

	// A live worker whose grandchild was orphaned: adopted by us, but it
	// carries the marks of a running worker, so it stays.
	m := Marker{Node: "n", Run: uniqueRun(t), Worker: "w1"}
	out := &lines{}
	worker, err := Start(s, helperCmd("orphaner"), StartOptions{Stdout: out.add, Marker: m, Events: events.add})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(worker.Kill)
	waitFor(t, "orphaner and its orphan", 5*time.Second, func() bool { return len(out.pids("pid")) == 2 })
	kept := identities(out.pids("pid")[1:])
	waitFor(t, "the orphan to be adopted", 5*time.Second, func() bool {
		st, err := readStat(kept[0].PID)
		return err == nil && st.ppid == os.Getpid()
	})

	// An unmarked orphan of a helper we started ourselves: killed.
	doomed := startOrphan(t)

	// A child os/exec waits for, exited but not yet waited: never ours to reap.
	exit7 := helperCmd("exit7")
	if err := exit7.Start(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "exit7 to exit", 5*time.Second, func() bool {
		st, err := readStat(exit7.Process.Pid)
		return err == nil && st.exited()
	})

	reaped, err := s.ReapAdopted(events.add)
	if err != nil {
		t.Fatal(err)
	}
	if reaped != 1 {
		t.Errorf("reaped %d, want the unmarked orphan", reaped)
	}
	if !kept[0].Alive() {
		t.Error("the orphan of a live worker was killed")
	}
	if _, err := readStat(doomed[0].PID); !errors.Is(err, ErrNoProcess) {
		t.Errorf("the unmarked orphan is still there: %v", err)
	}
	if got := events.pids(); len(got) != 1 || got[0] != doomed[0].PID {
		t.Errorf("orphan_reaped for %v, want %d", got, doomed[0].PID)
	}
	if err := exit7.Wait(); exit7.ProcessState == nil || exit7.ProcessState.ExitCode() != 7 {
		t.Errorf("os/exec lost its child's exit status: %v", err)
	}
	if !worker.Identity().Alive() {
		t.Error("the worker itself was touched")
	}

	// Once the worker is gone, its adopted orphan dies with it and is reaped.
	worker.Kill()
	if kept[0].Alive() {
		t.Error("the orphan outlived its worker")
	}
	if reaped, err := s.ReapAdopted(events.add); err != nil || reaped != 1 {
		t.Errorf("ReapAdopted after the worker = %d, %v; want its orphan's zombie", reaped, err)
	}
	if _, err := readStat(kept[0].PID); !errors.Is(err, ErrNoProcess) {
		t.Errorf("zombie left: %v", err)
	}
}

// A live run whose lock file was removed, or replaced by an unlocked file
// (which looks like a tombstone), is still alive: its records name its node
// process, which runs. Once that process is dead, the same run is reaped.
func TestReaperKeepsLiveRunWhoseLockFileIsGone(t *testing.T) {
	dir := t.TempDir()
	s := mustSpawner(t)
	m := Marker{Node: "live", Run: uniqueRun(t)}
	node, ids := startFakeNode(t, s, dir, m)
	reg := mustRegistry(t, dir)
	path := lockPath(dir, m.Node, m.Run)
	var events eventLog
	for _, replaced := range []bool{false, true} {
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
		if replaced {
			if err := os.WriteFile(path, nil, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		// Each a fresh Reaper, as at the start of another node.
		for range 2 {
			if err := mustReaper(t, dir, reg, &events).Sweep(); err != nil {
				t.Fatal(err)
			}
		}
		for _, id := range ids {
			if !id.Alive() {
				t.Fatalf("lock file removed (replaced: %v): %v of a live run was killed", replaced, id)
			}
		}
		if ev := events.get(); len(ev) != 0 {
			t.Fatalf("events for a live run: %+v", ev)
		}
		if recs, _ := reg.List(); len(recs) != 1 {
			t.Fatalf("records of a live run: %+v", recs)
		}
	}

	node.Kill()
	waitDone(t, node, 5*time.Second)
	_ = os.Remove(path)
	if err := mustReaper(t, dir, reg, &events).Sweep(); err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		if id.Alive() {
			t.Errorf("%v of the dead run survived the sweep", id)
		}
	}
	if n := len(events.get()); n != len(ids) {
		t.Errorf("%d orphan_reaped events, want %d", n, len(ids))
	}
}

// The Reaper of a run never sweeps it and puts its lock file back: here the
// run's record says nothing of its node (as an older version wrote it), so
// only the lock can keep the run alive, for this Reaper and for another
// node's.
func TestReaperRestoresItsOwnLockFile(t *testing.T) {
	dir := t.TempDir()
	run := uniqueRun(t)
	lock, err := AcquireNodeLock(dir, "me", run)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Release()
	reg := mustRegistry(t, dir)
	p, _ := mustStart(t, mustSpawner(t), "sleep")
	id := p.Identity()
	putRaw(t, reg, Record{Node: "me", Run: run, Worker: "w1", PID: id.PID, PGID: p.PGID(), StartTime: id.StartTime, BootID: id.BootID, State: StateRunning})
	var events eventLog
	own, err := NewReaper(ReaperConfig{StateDir: dir, Registry: reg, Lock: lock, Events: events.add, Logger: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	path := lockPath(dir, "me", run)
	for _, replaced := range []bool{false, true} {
		if err := os.Remove(path); err != nil {
			t.Fatal(err)
		}
		if replaced {
			if err := os.WriteFile(path, nil, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		if err := own.Sweep(); err != nil {
			t.Fatal(err)
		}
		if !NodeAlive(dir, "me", run) {
			t.Fatalf("replaced %v: the lock file is not back after the run's own sweep", replaced)
		}
		if err := mustReaper(t, dir, reg, &events).Sweep(); err != nil {
			t.Fatal(err)
		}
		if !id.Alive() || len(events.get()) != 0 {
			t.Fatalf("replaced %v: worker alive %v, events %+v", replaced, id.Alive(), events.get())
		}
	}
	if recs, _ := reg.List(); len(recs) != 1 {
		t.Errorf("records: %+v", recs)
	}
}

// startOrphan runs a helper that starts a child and exits, and returns the
// identity of that child, now an orphan with no marks (adopted by this
// process, a subreaper). The test's cleanup kills it. Its output goes to a
// file: a pipe would stay open as long as the orphan lives.
func startOrphan(t *testing.T) []Identity {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "out"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	mid := helperCmd("middle")
	mid.Stdout = f
	if err := mid.Run(); err != nil {
		t.Fatal(err)
	}
	var orphan []Identity
	waitFor(t, "the orphan", 5*time.Second, func() bool {
		b, _ := os.ReadFile(f.Name())
		l := &lines{}
		for line := range strings.Lines(string(b)) {
			l.add([]byte(strings.TrimSuffix(line, "\n")))
		}
		orphan = identities(l.pids("pid"))
		return len(orphan) == 1
	})
	t.Cleanup(func() { killIdentities(orphan) })
	return orphan
}
