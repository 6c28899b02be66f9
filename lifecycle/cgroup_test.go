package lifecycle

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
)

// mustCgroup returns ModeCgroup for run m, on the real cgroup v2 of the
// machine, and removes the run's cgroup (killing what is left in it) at the
// end of the test, failing it if a directory stays. Its workers get no PID
// namespace, so that the tests see the cgroup's own guarantees, and the
// pids the helpers print are the host's; TestCgroupWithPIDNamespaces and
// TestCgroupNamespacesDieWithNode test the two together.
func mustCgroup(t *testing.T, m Marker) *cgroupContainment {
	t.Helper()
	cg := mustCgroupNS(t, m)
	cg.ns, cg.nsWhy = nil, errors.New("turned off by the test")
	return cg
}

// mustCgroupNS is mustCgroup with PID namespaces where the host allows.
func mustCgroupNS(t *testing.T, m Marker) *cgroupContainment {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("cgroup containment needs a cgroup subtree of this user's; the tests use root's")
	}
	c, err := NewCgroupContainment(m)
	if errors.Is(err, ErrContainmentUnavailable) {
		t.Skipf("this machine offers no cgroup containment: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	cg := c.(*cgroupContainment)
	t.Cleanup(func() {
		if _, err := killCgroupTree(cg.runDir, m, "test cleanup", nil, 5*time.Second); err != nil {
			t.Errorf("cleanup: %v", err)
		}
		if _, err := os.Stat(cg.runDir); err == nil {
			t.Errorf("cgroup %s left behind", cg.runDir)
		}
	})
	return cg
}

// cgroupOf is the cgroup v2 path of pid, as /proc/<pid>/cgroup shows it.
func cgroupOf(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	path, err := ownCgroup(b)
	if err != nil {
		t.Fatal(err)
	}
	return path
}

// pathIn is the cgroup path (as /proc/<pid>/cgroup shows it) of dir.
func pathIn(c *cgroupContainment, dir string) string {
	rel, _ := filepath.Rel(c.mount, dir)
	return filepath.Clean("/" + rel)
}

// Every process of a worker start is born in the start's cgroup, and dies
// with the worker, however it left the worker's group and whatever it did
// to its environment: the cgroup is killed as the worker exits, then
// removed. Without a cgroup (ModeGroup), a child that dropped the marker and
// left the group survives its worker: the hole this mode closes.
func TestCgroupKillsWholeTreeWithWorker(t *testing.T) {
	m := Marker{Node: "n", Run: uniqueRun(t)}
	c := mustCgroup(t, m)
	s := mustSpawner(t)
	for _, tc := range []struct {
		mode    string
		contain Containment
	}{
		{"clean-child", c},
		{"clean-escape", c},
		{"clean-escape", nil}, // ModeGroup: the known hole
	} {
		w := m
		w.Worker = tc.mode
		out := &lines{}
		p, err := Start(s, helperCmd(tc.mode), StartOptions{Stdout: out.add, Stderr: out.add, Marker: w, Contain: tc.contain})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			p.Kill()
			killIdentities(identities(out.pids("pid")))
		})
		waitFor(t, tc.mode+" and its child", 5*time.Second, func() bool { return len(out.pids("pid")) == 2 })
		ids := identities(out.pids("pid"))
		if len(ids) != 2 || ids[0].PID != p.PID() {
			t.Fatalf("%s: processes %v, want the worker %d and its child", tc.mode, ids, p.PID())
		}
		child := ids[1]
		if k, _ := readMarks(child.PID); k != (marks{}) {
			t.Fatalf("%s: the child carries marks %+v; it must have a clean environment", tc.mode, k)
		}
		dir := filepath.Join(c.runDir, w.Worker)
		// Where the memory controller is missing (this machine), the
		// container does not account, and --max-memory sums RSS instead.
		if bytes, ok := p.Memory(); tc.contain != nil && (ok != c.ctrl["memory"] || ok && bytes == 0) {
			t.Errorf("%s: Memory() = %d, %v with the memory controller %v", tc.mode, bytes, ok, c.ctrl["memory"])
		}
		if tc.contain != nil {
			for _, id := range ids {
				if got := cgroupOf(t, id.PID); got != pathIn(c, dir) {
					t.Errorf("%s: pid %d is in cgroup %s, want %s", tc.mode, id.PID, got, pathIn(c, dir))
				}
			}
		}

		start := time.Now()
		if err := syscall.Kill(p.PID(), syscall.SIGKILL); err != nil { // the worker dies by itself
			t.Fatal(err)
		}
		waitDone(t, p, 10*time.Second)
		took, _ := waitGoneIDs([]Identity{child}, time.Second)
		if tc.contain == nil {
			if !child.Alive() {
				t.Fatalf("group mode: the clean-environment escapee %d died with its worker; this test no longer shows the hole cgroups close", child.PID)
			}
			t.Logf("group mode: the clean-environment setsid child %d outlives its worker, as expected (no group, no marker)", child.PID)
			continue
		}
		if child.Alive() {
			t.Errorf("%s: the child %d outlived its worker's cgroup", tc.mode, child.PID)
		}
		if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s: the worker's cgroup %s is still there after Done: %v", tc.mode, dir, err)
		}
		t.Logf("%s: worker SIGKILLed to its whole tree gone and its cgroup removed: %s (child gone after %s)", tc.mode, time.Since(start), took)
	}
}

// waitGoneIDs waits up to limit for every process in ids to be gone.
func waitGoneIDs(ids []Identity, limit time.Duration) (time.Duration, []Identity) {
	start := time.Now()
	for {
		var left []Identity
		for _, id := range ids {
			if id.Alive() {
				left = append(left, id)
			}
		}
		if len(left) == 0 || time.Since(start) > limit {
			return time.Since(start), left
		}
		time.Sleep(time.Millisecond)
	}
}

// On the node's death the guardian kills the process group of every worker
// the node told it of, and so the child a worker started with a clean
// environment in its group. A group it was told of with another start time
// (its id reused) and a group that ended are not touched; lines that are
// not the protocol's are skipped.
func TestGuardianKillsWorkerGroups(t *testing.T) {
	m := Marker{Node: "n", Run: uniqueRun(t)}
	t.Setenv("GORACE", "atexit_sleep_ms=0") // the guardian is this test binary
	state := t.TempDir()
	if err := os.MkdirAll(filepath.Join(state, "nodes"), 0o700); err != nil {
		t.Fatal(err)
	}
	g, err := StartGuardian(m, state, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Stop)
	s := mustSpawner(t)
	out := &lines{}
	w := m
	w.Worker = "w1"
	p, err := Start(s, helperCmd("clean-child"), StartOptions{Stdout: out.add, Stderr: out.add, Marker: w, Guardian: g})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.Kill()
		killIdentities(identities(out.pids("pid")))
	})
	waitFor(t, "worker and child", 5*time.Second, func() bool { return len(out.pids("pid")) == 2 })
	ids := identities(out.pids("pid"))

	bystander := func() Identity {
		cmd := helperCmd("sleep")
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		})
		id, err := ReadIdentity(cmd.Process.Pid)
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	reused, ended := bystander(), bystander()
	stale := reused
	stale.StartTime++
	g.groupStarted(reused.PID, stale, "reused")
	g.groupStarted(ended.PID, ended, "ended")
	g.groupEnded(ended.PID)
	g.tell("garbage\n")
	g.tell("+notanumber 1 x\n")
	g.tell("+1 0 init\n") // never a worker's group

	start := time.Now()
	g.Stop()
	if _, left := waitGoneIDs(ids, time.Second); len(left) > 0 {
		t.Errorf("still running after the guardian's sweep: %v", left)
	}
	t.Logf("the guardian's sweep took %s", time.Since(start))
	for _, id := range []Identity{reused, ended} {
		if !id.Alive() {
			t.Errorf("the guardian killed group %d, which it must not", id.PID)
		}
	}
	var published eventLog
	if _, err := PublishJournals(state, published.add); err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		es := slices.DeleteFunc(published.get(), func(e Event) bool { return e.PID != id.PID })
		if len(es) != 1 || es[0].PGID != p.PGID() || es[0].Worker != "w1" || !strings.Contains(es[0].Detail, "process group") {
			t.Errorf("events for pid %d: %+v, want one, for the group %d of w1", id.PID, es, p.PGID())
		}
	}
}

// In ModeCgroup the guardian kills the run's cgroup on the node's death:
// a worker's child that left the group and dropped the marker dies too,
// and the run's cgroups are removed.
func TestGuardianKillsRunCgroup(t *testing.T) {
	m := Marker{Node: "n", Run: uniqueRun(t)}
	c := mustCgroup(t, m)
	t.Setenv("GORACE", "atexit_sleep_ms=0")
	state := t.TempDir()
	if err := os.MkdirAll(filepath.Join(state, "nodes"), 0o700); err != nil {
		t.Fatal(err)
	}
	g, err := StartGuardian(m, state, c)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Stop)
	s := mustSpawner(t)
	var ids []Identity
	for _, name := range []string{"w1", "w2"} {
		out := &lines{}
		w := m
		w.Worker = name
		p, err := Start(s, helperCmd("clean-escape"), StartOptions{Stdout: out.add, Stderr: out.add, Marker: w, Contain: c, Guardian: g})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			p.Kill()
			killIdentities(identities(out.pids("pid")))
		})
		waitFor(t, name+" and its child", 5*time.Second, func() bool { return len(out.pids("pid")) == 2 })
		ids = append(ids, identities(out.pids("pid"))...)
	}
	bystander := helperCmd("sleep")
	if err := bystander.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = bystander.Process.Kill()
		_ = bystander.Wait()
	})

	start := time.Now()
	g.Stop()
	if _, left := waitGoneIDs(ids, time.Second); len(left) > 0 {
		t.Errorf("still running after the guardian's sweep: %v", left)
	}
	t.Logf("guardian's sweep: %d processes in 2 worker cgroups gone, the cgroups removed and the guardian exited %s after the node's end closed", len(ids), time.Since(start))
	if _, err := os.Stat(c.runDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the run's cgroup is still there: %v", err)
	}
	if id, err := ReadIdentity(bystander.Process.Pid); err != nil || !id.Alive() {
		t.Error("the guardian killed a process outside the run's cgroup")
	}
	var published eventLog
	if _, err := PublishJournals(state, published.add); err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		es := slices.DeleteFunc(published.get(), func(e Event) bool { return e.PID != id.PID })
		if len(es) != 1 || es[0].Run != m.Run || !strings.HasPrefix(es[0].Worker, "w") || !strings.Contains(es[0].Detail, "cgroup") {
			t.Errorf("events for pid %d: %+v, want one orphan_reaped naming its worker and the cgroup", id.PID, es)
		}
	}
}

// startInCgroup forks a clean-escape tree straight into worker w's cgroup
// under c without supervising it, as a dead node would have left it, and
// returns its two processes.
func startInCgroup(t *testing.T, c *cgroupContainment, w Marker) []Identity {
	t.Helper()
	cmd := helperCmd("clean-escape")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out := readLinesOf(t, cmd)
	box, err := c.Prepare(cmd, w)
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		_ = box.Release()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		_ = box.Kill()
		_ = box.Release()
	})
	// The pids the tree announces, not cgroup.procs: a Go program's first
	// start of a process forks a short-lived probe first (os/exec's pidfd
	// check), which cgroup.procs shows for a moment.
	waitFor(t, "the tree in "+w.Worker+"'s cgroup", 5*time.Second, func() bool { return len(out.pids("pid")) == 2 })
	ids := identities(out.pids("pid"))
	procs, err := cgroupTreeProcs(filepath.Join(c.runDir, w.Worker))
	if err != nil || len(procs) != 2 || len(ids) != 2 {
		t.Fatalf("in the cgroup: %+v, %v; the tree: %v", procs, err, ids)
	}
	return ids
}

// A node's sweep kills and removes the cgroups of dead runs, found through
// the state dir's records or beside its own cgroup, with an orphan_reaped
// event per process found in them, and never touches the cgroup of a live
// run, of a run the state dir does not know, or one a record names under
// another run's name.
func TestReaperKillsCgroupsOfDeadRuns(t *testing.T) {
	dir := t.TempDir()
	self := Marker{Node: "live", Run: uniqueRun(t)}
	lock, err := AcquireNodeLock(dir, self.Node, self.Run)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lock.Release() })
	own := mustCgroup(t, self)
	tombstone := func(m Marker) {
		if err := os.WriteFile(lockPath(dir, m.Node, m.Run), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	dead := Marker{Node: "dead", Run: uniqueRun(t)} // its cgroup beside ours, and no record
	recorded := Marker{Node: "gone", Run: uniqueRun(t)}
	unknown := Marker{Node: "other", Run: uniqueRun(t)} // no trace in this state dir
	bogus := Marker{Node: "bogus", Run: uniqueRun(t)}   // a dead run whose record names our cgroup
	tombstone(recorded)
	tombstone(bogus)
	deadC, recC, unknownC := mustCgroup(t, dead), mustCgroup(t, recorded), mustCgroup(t, unknown)
	if err := writeCgroupRecord(dir, recC); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cgroupRecordPath(dir, bogus), []byte(own.runDir+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	worker := func(m Marker) Marker { m.Worker = "w1"; return m }
	ownIDs := startInCgroup(t, own, worker(self))
	deadIDs := startInCgroup(t, deadC, worker(dead))
	recIDs := startInCgroup(t, recC, worker(recorded))
	unknownIDs := startInCgroup(t, unknownC, worker(unknown))
	reg := mustRegistry(t, dir)

	alive := func(what string, ids []Identity) {
		t.Helper()
		for _, id := range ids {
			if !id.Alive() {
				t.Errorf("%s: %v was killed", what, id)
			}
		}
	}
	gone := func(what string, ids []Identity, c *cgroupContainment) {
		t.Helper()
		if _, left := waitGoneIDs(ids, time.Second); len(left) > 0 {
			t.Errorf("%s: still running after the sweep: %v", what, left)
		}
		if _, err := os.Stat(c.runDir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s: cgroup %s still there: %v", what, c.runDir, err)
		}
	}

	// Records only: a node that is not in cgroup mode still finds them.
	var events eventLog
	r, err := NewReaper(ReaperConfig{StateDir: dir, Registry: reg, Lock: lock, Events: events.add, Logger: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Sweep(); err != nil {
		t.Fatal(err)
	}
	gone("recorded dead run", recIDs, recC)
	alive("dead run known only beside our cgroup, swept by a reaper not in cgroup mode", deadIDs)
	alive("the live run", ownIDs)
	alive("the unknown run", unknownIDs)
	if _, err := os.Stat(cgroupRecordPath(dir, recorded)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the swept run's cgroup record: %v", err)
	}
	for _, id := range recIDs {
		es := slices.DeleteFunc(events.get(), func(e Event) bool { return e.PID != id.PID })
		if len(es) != 1 || es[0].Kind != KindOrphanReaped || es[0].Node != recorded.Node || es[0].Run != recorded.Run || es[0].Worker != "w1" {
			t.Errorf("events for pid %d: %+v", id.PID, es)
		}
	}

	// In cgroup mode the reaper also looks beside its own cgroup (where
	// a run that died before its first sweep left its cgroup unrecorded),
	// and records where that is. (The run dies now: a sweep that finds
	// nothing of a dead run removes its tombstone, and a reaper not in
	// cgroup mode sees no cgroup it was not told of.)
	tombstone(dead)
	r, err = NewReaper(ReaperConfig{StateDir: dir, Registry: reg, Lock: lock, Events: events.add, Logger: zaptest.NewLogger(t), Containment: own})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := r.Sweep(); err != nil {
		t.Fatal(err)
	}
	gone("dead run beside ours", deadIDs, deadC)
	t.Logf("sweep of a dead run's cgroup (2 processes): %s", time.Since(start))
	alive("the live run", ownIDs)
	alive("the unknown run", unknownIDs)
	if b, err := os.ReadFile(cgroupRecordPath(dir, self)); err != nil || strings.TrimSpace(string(b)) != own.runDir {
		t.Errorf("own cgroup record: %q, %v; want %s", b, err, own.runDir)
	}
	if got := len(events.get()); got != len(recIDs)+len(deadIDs) {
		t.Errorf("%d events, want %d: %+v", got, len(recIDs)+len(deadIDs), events.get())
	}
	if _, err := NewReaper(ReaperConfig{StateDir: dir, Registry: reg, Containment: deadC}); err == nil {
		t.Error("a reaper accepted the cgroup containment of a run not its own")
	}
	if err := lock.Release(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(cgroupRecordPath(dir, self)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("own cgroup record after Release: %v", err)
	}
}

// NewCgroupContainment on this machine: the run's cgroup is created under
// the node's own, and the limits the host cannot enforce are refused with
// the controller and the reason.
func TestCgroupContainmentOnThisMachine(t *testing.T) {
	m := Marker{Node: "n", Run: uniqueRun(t)}
	c := mustCgroup(t, m)
	if c.Mode() != ModeCgroup || filepath.Dir(c.runDir) != c.nodeDir || filepath.Base(c.runDir) != "pyfleet.n."+m.Run {
		t.Errorf("containment %+v", c)
	}
	if self := cgroupOf(t, os.Getpid()); pathIn(c, c.nodeDir) != self {
		t.Errorf("node cgroup %s, want this process's %s", c.nodeDir, self)
	}
	if _, err := NewCgroupContainment(m); !errors.Is(err, ErrRunTaken) {
		t.Errorf("a second containment of one run: %v", err)
	}
	if _, err := NewCgroupContainment(Marker{Node: "n", Run: "r", Worker: "w"}); !errors.Is(err, ErrInvalidName) {
		t.Errorf("a containment of a worker: %v", err)
	}
	avail := readFields(filepath.Join(c.nodeDir, "cgroup.controllers"))
	for _, tc := range []struct {
		ctrl string
		lim  Limits
	}{{"memory", Limits{Memory: 64 << 20}}, {"pids", Limits{Pids: 100}}} {
		err := c.CheckLimits(tc.lim)
		t.Logf("%s: %v", tc.ctrl, err)
		if !slices.Contains(avail, tc.ctrl) && (!errors.Is(err, ErrContainmentUnavailable) ||
			!strings.Contains(err.Error(), tc.ctrl+" controller is not available at "+c.nodeDir)) {
			t.Errorf("limit %+v without the %s controller: %v", tc.lim, tc.ctrl, err)
		}
		if err != nil {
			cmd := helperCmd("sleep")
			if _, serr := Start(mustSpawner(t), cmd, StartOptions{Marker: Marker{Node: "n", Run: m.Run, Worker: "w1"}, Contain: c, Limits: tc.lim}); !errors.Is(serr, ErrContainmentUnavailable) {
				t.Errorf("Start with a limit the host cannot enforce: %v", serr)
			}
		}
	}
	if _, err := Start(mustSpawner(t), helperCmd("sleep"), StartOptions{Limits: Limits{Pids: 5}}); !errors.Is(err, ErrContainmentUnavailable) {
		t.Errorf("Start with a limit in group mode: %v", err)
	}
}

// The files cgroup containment reads, as the kernel writes them.
func TestCgroupParsing(t *testing.T) {
	mountinfo := `22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
50 22 0:40 /system.slice/x.service /mnt/cg\040two rw master:3 - cgroup2 cgroup2 rw,nsdelegate
`
	mounts := cgroup2Mounts([]byte(mountinfo))
	want := []cgroupMount{{"/", "/sys/fs/cgroup/unified"}, {"/system.slice/x.service", "/mnt/cg two"}}
	if !slices.Equal(mounts, want) {
		t.Errorf("cgroup2 mounts %+v, want %+v", mounts, want)
	}
	for _, tc := range []struct {
		mounts          []cgroupMount
		path, mnt, dir  string
		wantErr         bool
		procCgroup      string
		procCgroupError bool
	}{
		{mounts: mounts, procCgroup: "4:memory:/x\n0::/\n", mnt: "/sys/fs/cgroup/unified", dir: "/sys/fs/cgroup/unified"},
		{mounts: mounts, procCgroup: "0::/system.slice/pool.service\n", mnt: "/sys/fs/cgroup/unified", dir: "/sys/fs/cgroup/unified/system.slice/pool.service"},
		{mounts: mounts[1:], procCgroup: "0::/system.slice/x.service/sub\n", mnt: "/mnt/cg two", dir: "/mnt/cg two/sub"},
		{mounts: mounts[1:], procCgroup: "0::/system.slice/x.service\n", mnt: "/mnt/cg two", dir: "/mnt/cg two"},
		{mounts: mounts[1:], procCgroup: "0::/system.slice/x.servicex\n", wantErr: true},
		{mounts: mounts, procCgroup: "1:name=systemd:/\n", procCgroupError: true},
		{mounts: mounts, procCgroup: "0::/gone (deleted)\n", procCgroupError: true},
	} {
		path, err := ownCgroup([]byte(tc.procCgroup))
		if tc.procCgroupError {
			if err == nil {
				t.Errorf("ownCgroup(%q) = %q, want an error", tc.procCgroup, path)
			}
			continue
		}
		if err != nil {
			t.Fatalf("ownCgroup(%q): %v", tc.procCgroup, err)
		}
		mnt, dir, err := locateCgroup(tc.mounts, path)
		if tc.wantErr != (err != nil) || mnt != tc.mnt || dir != tc.dir {
			t.Errorf("locateCgroup(%+v, %q) = %q, %q, %v; want %q, %q", tc.mounts, path, mnt, dir, err, tc.mnt, tc.dir)
		}
	}
	m := Marker{Node: "n1", Run: "ab12"}
	if got, ok := parseCgroupRunName(cgroupRunName(m)); !ok || got != m {
		t.Errorf("parseCgroupRunName(%q) = %+v, %v", cgroupRunName(m), got, ok)
	}
	for _, bad := range []string{"pyfleet.n1", "pyfleet..r", "other.n.r", "pyfleet.n.r.x"} {
		if m, ok := parseCgroupRunName(bad); ok {
			t.Errorf("parseCgroupRunName(%q) = %+v", bad, m)
		}
	}
}

// fakeCgroup makes a directory holding the given interface files, as a
// cgroup would (on a plain file system: for what this machine's cgroup v2
// cannot show, the memory and pids controllers).
func fakeCgroup(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// Which controllers the workers get, from the node's cgroup's files: only
// those the node's cgroup passes down, and for the others, why not.
func TestCgroupControllers(t *testing.T) {
	for _, tc := range []struct {
		name                  string
		controllers, subtree  string
		memory, pids          bool
		memoryWhy, pidsWhy    string
		runSubtreeAfterEnable string
	}{
		{name: "this machine", controllers: "hugetlb\n", subtree: "\n",
			memoryWhy: "memory controller is not available at", pidsWhy: "pids controller is not available at"},
		{name: "delegated unit holding the node", controllers: "cpu memory pids\n", subtree: "\n",
			memoryWhy: "not passed to its children", pidsWhy: "not passed to its children"},
		{name: "root of a systemd host", controllers: "cpuset cpu io memory hugetlb pids rdma misc\n", subtree: "cpu io memory pids\n",
			memory: true, pids: true, runSubtreeAfterEnable: "+pids"},
		{name: "pids only", controllers: "memory pids\n", subtree: "pids\n",
			pids: true, memoryWhy: "not passed to its children", runSubtreeAfterEnable: "+pids"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			node := fakeCgroup(t, map[string]string{"cgroup.controllers": tc.controllers, "cgroup.subtree_control": tc.subtree})
			run := fakeCgroup(t, map[string]string{"cgroup.subtree_control": ""})
			c := &cgroupContainment{marker: Marker{Node: "n", Run: "r"}, nodeDir: node, runDir: run}
			c.setupControllers()
			if c.ctrl["memory"] != tc.memory || c.ctrl["pids"] != tc.pids {
				t.Errorf("controllers %v, want memory %v pids %v", c.ctrl, tc.memory, tc.pids)
			}
			for _, x := range []struct {
				lim Limits
				why string
			}{{Limits{Memory: 1 << 30}, tc.memoryWhy}, {Limits{Pids: 64}, tc.pidsWhy}} {
				err := c.CheckLimits(x.lim)
				if x.why == "" && err != nil || x.why != "" && (!errors.Is(err, ErrContainmentUnavailable) || !strings.Contains(err.Error(), x.why) || !strings.Contains(err.Error(), node)) {
					t.Errorf("CheckLimits(%+v) = %v, want %q", x.lim, err, x.why)
				}
			}
			// The fake file keeps the last write, as the kernel keeps the set.
			if got := readFile(t, filepath.Join(run, "cgroup.subtree_control")); got != tc.runSubtreeAfterEnable {
				t.Errorf("run cgroup's subtree_control %q, want %q", got, tc.runSubtreeAfterEnable)
			}
		})
	}
}

// A worker's container: the limits it writes, and what it reads back.
func TestCgroupContainerFiles(t *testing.T) {
	files := map[string]string{"memory.max": "max\n", "memory.oom.group": "0\n", "memory.swap.max": "max\n", "pids.max": "max\n",
		"memory.current": "73728000\n", "memory.events": "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 1\n",
		"cgroup.events": "populated 0\nfrozen 0\n"}
	dir := fakeCgroup(t, files)
	b := &cgroupContainer{dir: dir, fd: -1, memory: true}
	if err := b.limit(Limits{Memory: 256 << 20, Pids: 512}); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]string{"memory.max": "268435456", "memory.oom.group": "1", "memory.swap.max": "0", "pids.max": "512"} {
		if got := readFile(t, filepath.Join(dir, name)); got != want {
			t.Errorf("%s = %q, want %q", name, got, want)
		}
	}
	if n, ok := b.Memory(); !ok || n != 73728000 {
		t.Errorf("Memory() = %d, %v", n, ok)
	}
	if n := b.OOMKills(); n != 1 {
		t.Errorf("OOMKills() = %d, want 1", n)
	}
	if err := waitUnpopulated(dir, time.Second); err != nil {
		t.Errorf("waitUnpopulated on populated 0: %v", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.events"), []byte("populated 1\nfrozen 0\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := waitUnpopulated(dir, 50*time.Millisecond); err == nil {
		t.Error("waitUnpopulated on populated 1 returned nil")
	}
	// Without the memory controller it accounts for nothing, and a limit
	// file that is missing is an error, not a new plain file.
	off := &cgroupContainer{dir: dir, fd: -1}
	if _, ok := off.Memory(); ok || off.OOMKills() != 0 {
		t.Error("a container without the memory controller reported memory")
	}
	bare := &cgroupContainer{dir: t.TempDir(), fd: -1}
	if err := bare.limit(Limits{Pids: 5}); err == nil {
		t.Error("limit wrote a pids.max that did not exist")
	}
}

// A Process reads memory and OOM kills through its container; without one
// that accounts, it reports none.
func TestProcessMemoryWithoutAccounting(t *testing.T) {
	p, _ := mustStart(t, mustSpawner(t), "sleep")
	if _, ok := p.Memory(); ok {
		t.Error("a process in group mode reported its container's memory")
	}
	p.Kill()
	if p.Exit().OOMKilled {
		t.Error("OOMKilled without a container that can tell")
	}
}

// The cost of a worker's cgroup: a start and end of a process that exits
// at once, with and without one (mkdir, the directory fd, CLONE_INTO_CGROUP,
// cgroup.kill, the wait for it to empty and rmdir).
func BenchmarkStartExit(b *testing.B) {
	for _, mode := range []string{ModeGroup, ModeCgroup} {
		b.Run(mode, func(b *testing.B) {
			m := Marker{Node: "bench", Run: "r" + strconv.Itoa(os.Getpid()) + "x" + strconv.FormatInt(time.Now().UnixNano(), 36)}
			var contain Containment
			if mode == ModeCgroup {
				c, err := NewCgroupContainment(m)
				if err != nil {
					b.Skip(err)
				}
				defer c.(*cgroupContainment).Close()
				contain = c
			}
			s := NewSpawner()
			defer s.Close()
			for i := 0; b.Loop(); i++ {
				w := m
				w.Worker = "w" + strconv.Itoa(i)
				p, err := Start(s, exec.Command("/bin/true"), StartOptions{Marker: w, Contain: contain})
				if err != nil {
					b.Fatal(err)
				}
				<-p.Done()
			}
		})
	}
}

// TestCgroupWithPIDNamespaces: where the host allows both, a cgroup's
// worker runs under the init of its own PID namespace, and everything of
// it (init, worker, a clean-environment setsid escapee) is in the worker
// start's cgroup; the worker's exit status is its own, not the init's; a
// Kill ends all of it.
func TestCgroupWithPIDNamespaces(t *testing.T) {
	m := Marker{Node: "n", Run: uniqueRun(t)}
	c := mustCgroupNS(t, m)
	if c.ns == nil {
		t.Skipf("no PID namespaces here: %v", c.PIDNamespaces())
	}
	if err := c.PIDNamespaces(); err != nil {
		t.Fatalf("PIDNamespaces() = %v with namespaces on", err)
	}
	s := mustSpawner(t)
	w := m
	w.Worker = "w1"
	p, out := startContainedAs(t, s, c, "clean-escape", w)
	waitFor(t, "the helper and its escapee", 5*time.Second, func() bool { return len(out.pids("pid")) == 2 })
	members := nsMembers(t, p.PID())
	if len(members) != 3 {
		t.Fatalf("namespace members %v, want the init, the helper and its escapee", members)
	}
	want := pathIn(c, filepath.Join(c.runDir, w.Worker))
	for _, id := range members {
		if got := cgroupOf(t, id.PID); got != want {
			t.Errorf("pid %d is in cgroup %s, want %s", id.PID, got, want)
		}
	}
	if _, ok := p.box.(Accounting); !ok {
		t.Errorf("the container %T does not account like a cgroup", p.box)
	}
	p.Kill()
	for _, id := range members {
		if id.Alive() {
			t.Errorf("%v alive after Kill", id)
		}
	}

	// The exit status is the helper's, mirrored by the init.
	w.Worker = "w2"
	p, _ = startContainedAs(t, s, c, "exit7", w)
	<-p.Done()
	if st := p.Exit(); st.Code != 7 {
		t.Errorf("exit status %+v, want code 7", st)
	}
}

// TestCgroupNamespacesDieWithNode is the row a cgroup alone cannot cover:
// the node (here a helper with a Spawner of its own) is SIGKILLed, and
// nothing (no guardian, no lifeline, no later node) kills the cgroup. The
// init's parent-death signal ends the namespace, the escapee with it.
func TestCgroupNamespacesDieWithNode(t *testing.T) {
	m := Marker{Node: "n", Run: uniqueRun(t)}
	c := mustCgroupNS(t, m) // removes the run's cgroup the helper made
	if c.ns == nil {
		t.Skipf("no PID namespaces here: %v", c.PIDNamespaces())
	}
	// The helper makes the run's cgroup itself: give it a run of its own
	// name beside this one.
	nodeRun := m
	nodeRun.Run += "n"
	t.Cleanup(func() {
		dir := filepath.Join(c.nodeDir, cgroupRunName(nodeRun))
		if _, err := killCgroupTree(dir, nodeRun, "test cleanup", nil, 5*time.Second); err != nil {
			t.Errorf("cleanup: %v", err)
		}
		if err := removeCgroupTree(dir); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	cmd := helperCmd("cgroup-node")
	cmd.Env = append(cmd.Env, "LIFECYCLE_TEST_RUN="+nodeRun.Run)
	// The init, the helper and its escapee.
	took := namespaceDiesWithNode(t, cmd, 3)
	t.Logf("3 processes gone %v after the node's SIGKILL", took.Round(time.Microsecond))
}
