package lifecycle

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/pyfleet/pyfleet/internal/testkit"
)

// mustPIDNS returns ModePIDNS's Containment, failing the test where the
// host does not offer it: the machines these tests run on do.
func mustPIDNS(t *testing.T) Containment {
	t.Helper()
	c, err := NewPIDNSContainment(Marker{Node: "n", Run: "r"})
	if err != nil {
		t.Fatalf("NewPIDNSContainment: %v", err)
	}
	if c.Mode() != ModePIDNS {
		t.Fatalf("Mode() = %q", c.Mode())
	}
	return c
}

// startContained starts a helper under c and makes sure everything of it is
// gone at the end of the test.
func startContained(t *testing.T, s *Spawner, c Containment, mode string, extra ...*os.File) (*Process, *lines) {
	t.Helper()
	return startContainedAs(t, s, c, mode, Marker{}, extra...)
}

// startContainedAs is startContained for the worker start m.
func startContainedAs(t *testing.T, s *Spawner, c Containment, mode string, m Marker, extra ...*os.File) (*Process, *lines) {
	t.Helper()
	out := &lines{}
	cmd := helperCmd(mode)
	cmd.ExtraFiles = extra
	p, err := Start(s, cmd, StartOptions{Stdout: out.add, Stderr: out.add, Contain: c, Marker: m})
	if err != nil {
		t.Fatalf("Start %s: %v", mode, err)
	}
	t.Cleanup(func() {
		p.Kill()
		killIdentities(nsMembers(t, p.PID()))
	})
	return p, out
}

// nsMembers returns the identities of the live processes in the PID
// namespace whose init has host pid init, init included.
func nsMembers(t *testing.T, init int) []Identity {
	t.Helper()
	ns, err := os.Readlink("/proc/" + strconv.Itoa(init) + "/ns/pid")
	if err != nil {
		return nil
	}
	pids, err := listPids()
	if err != nil {
		t.Fatal(err)
	}
	var out []Identity
	for _, pid := range pids {
		if other, err := os.Readlink("/proc/" + strconv.Itoa(pid) + "/ns/pid"); err == nil && other == ns {
			if id, err := ReadIdentity(pid); err == nil && id.Alive() {
				out = append(out, id)
			}
		}
	}
	return out
}

// nsPID returns pid's number in its own PID namespace: the last NSpid of
// /proc/<pid>/status.
func nsPID(t *testing.T, pid int) int {
	t.Helper()
	ids := nsPIDs(t, pid)
	return ids[len(ids)-1]
}

// nsPIDs is NSpid of /proc/<pid>/status: pid's number in each PID
// namespace that numbers it, outermost first.
func nsPIDs(t *testing.T, pid int) []int {
	t.Helper()
	status, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(status), "\n") {
		if rest, ok := strings.CutPrefix(line, "NSpid:"); ok {
			var ids []int
			for _, f := range strings.Fields(rest) {
				n, _ := strconv.Atoi(f)
				ids = append(ids, n)
			}
			if len(ids) > 0 {
				return ids
			}
		}
	}
	t.Fatalf("no NSpid in /proc/%d/status", pid)
	return nil
}

func TestPIDNSProbe(t *testing.T) {
	mustPIDNS(t)
}

// TestPIDNSInitRefusesTheNodesMountNamespace: an init started without a
// mount namespace of its own (by hand, or by a start that failed to make
// one) must not mount its /proc over the host's, nor make the host's /
// private: it refuses and exits before any mount.
func TestPIDNSInitRefusesTheNodesMountNamespace(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("only root could mount in the node's namespace at all")
	}
	procMounts := func() int {
		b, err := os.ReadFile("/proc/self/mountinfo")
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, line := range strings.Split(string(b), "\n") {
			if f := strings.Fields(line); len(f) > 4 && f[4] == "/proc" {
				n++
			}
		}
		return n
	}
	before := procMounts()
	var stderr strings.Builder
	cmd := exec.Command(os.Args[0], InitArg, "probe", strconv.Itoa(os.Getpid()))
	cmd.Stderr = &stderr
	err := cmd.Run()
	if after := procMounts(); after != before {
		for range after - before {
			_ = syscall.Unmount("/proc", syscall.MNT_DETACH) // undo what the init did to this host
		}
		t.Fatalf("the init mounted /proc in the node's mount namespace (%d mounts on /proc, %d before)", after, before)
	}
	if err == nil || !strings.Contains(stderr.String(), "not in a mount namespace of its own") {
		t.Fatalf("init probe in the node's mount namespace: %v, stderr %q", err, stderr.String())
	}
}

func TestPIDNSCommandIsInitsChild(t *testing.T) {
	s := mustSpawner(t)
	p, out := startContained(t, s, mustPIDNS(t), "sleep")
	waitFor(t, "pid line", 5*time.Second, func() bool { return len(out.pids("pid")) == 1 })
	members := nsMembers(t, p.PID())
	if len(members) != 2 {
		t.Fatalf("namespace members %v, want the init and the command", members)
	}
	// The init is PID 1 of the namespace; the command, its child, sees its
	// own pid in the namespace.
	for _, id := range members {
		inside := nsPID(t, id.PID)
		switch {
		case id.PID == p.PID() && inside != 1:
			t.Errorf("the init's pid in its namespace is %d, want 1", inside)
		case id.PID != p.PID() && inside != out.pids("pid")[0]:
			t.Errorf("the command says its pid is %d; the namespace numbers it %d", out.pids("pid")[0], inside)
		}
	}
	if pi, err := readStat(p.PID()); err != nil || pi.pgrp != p.PID() || p.PGID() != p.PID() {
		t.Errorf("init %d: pgrp %d (%v), PGID() %d: want its own group", p.PID(), pi.pgrp, err, p.PGID())
	}
	p.Stop(5 * time.Second)
	// SIGTERM went to the init, which passed it on: the helper has no
	// handler, so it died of it, and the init reports just that.
	if st := p.Exit(); st.Signal != "SIGTERM" {
		t.Errorf("exit %v, want signal SIGTERM", st)
	}
	for _, id := range members {
		if id.Alive() {
			t.Errorf("%v still alive after Stop", id)
		}
	}
}

func TestPIDNSExitStatusMirrored(t *testing.T) {
	s := mustSpawner(t)
	c := mustPIDNS(t)
	for _, tc := range []struct {
		mode string
		want ExitStatus
	}{
		{"exit7", ExitStatus{Code: 7}},
		{"lines", ExitStatus{Code: 0}},
		{"self-kill", ExitStatus{Code: -1, Signal: "SIGKILL"}},
		{"self-hup", ExitStatus{Code: -1, Signal: "SIGHUP"}},
	} {
		t.Run(tc.mode, func(t *testing.T) {
			p, out := startContained(t, s, c, tc.mode)
			waitDone(t, p, 10*time.Second)
			if got := p.Exit(); got != tc.want {
				t.Errorf("exit %v, want %v; output %q", got, tc.want, out.get())
			}
		})
	}
	t.Run("killed", func(t *testing.T) {
		p, out := startContained(t, s, c, "sleep")
		waitFor(t, "pid line", 5*time.Second, func() bool { return len(out.pids("pid")) == 1 })
		p.Kill()
		if got := p.Exit(); got.Signal != "SIGKILL" {
			t.Errorf("exit %v, want signal SIGKILL", got)
		}
	})
}

// TestPIDNSKeepsFdsAndOutput: the pipes given as ExtraFiles reach the
// command as fds 3 and 4, its output reaches the callbacks, and it holds the
// same pipes as without containment (not the init's status pipe).
func TestPIDNSKeepsFdsAndOutput(t *testing.T) {
	s := mustSpawner(t)
	c := mustPIDNS(t)
	run := func(c Containment) []string {
		var pipes [2][2]*os.File
		for i := range pipes {
			r, w, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			pipes[i] = [2]*os.File{r, w}
		}
		out := &lines{}
		cmd := helperCmd("fds")
		cmd.ExtraFiles = []*os.File{pipes[0][1], pipes[1][1]}
		p, err := Start(s, cmd, StartOptions{Stdout: out.add, Stderr: out.add, Contain: c})
		if err != nil {
			t.Fatal(err)
		}
		pipes[0][1].Close()
		pipes[1][1].Close()
		waitDone(t, p, 10*time.Second)
		if st := p.Exit(); st.Code != 0 {
			t.Fatalf("exit %v: %q", st, out.get())
		}
		for i, fd := range []int{3, 4} {
			b := make([]byte, 64)
			n, _ := pipes[i][0].Read(b)
			if want := fmt.Sprintf("fd %d", fd); string(b[:n]) != want {
				t.Errorf("pipe given as fd %d read %q, want %q", fd, b[:n], want)
			}
		}
		return out.get()
	}
	// "fd N is a pipe" lines name pipes beyond 4 that the test process
	// itself inherited; the init must add none.
	// Sorted: stdout and stderr are two pipes, read by two goroutines, so
	// their lines interleave differently from run to run.
	group, pidns := run(nil), run(c)
	slices.Sort(group)
	slices.Sort(pidns)
	if !slices.Contains(pidns, "stderr line") || !slices.Equal(group, pidns) {
		t.Errorf("output contained %q, uncontained %q", pidns, group)
	}
}

// TestPIDNSContainsEscapees: a setsid child with a clean environment (no
// marker, its own session, holding the output pipes) dies with the worker.
func TestPIDNSContainsEscapees(t *testing.T) {
	s := mustSpawner(t)
	p, out := startContained(t, s, mustPIDNS(t), "escape")
	waitFor(t, "two pids", 5*time.Second, func() bool { return len(out.pids("pid")) == 2 })
	members := nsMembers(t, p.PID())
	if len(members) != 3 {
		t.Fatalf("namespace members %v, want the init, the helper and its escapee", members)
	}
	start := time.Now()
	p.Kill()
	for _, id := range members {
		if id.Alive() {
			t.Errorf("%v alive after Kill", id)
		}
	}
	// Without the namespace the readers would wait drainTimeout for the
	// escapee to close the pipes.
	if d := time.Since(start); d > time.Second {
		t.Errorf("Kill took %v", d)
	}
}

// TestPIDNSInitDiesWithNode: the init's parent-death signal. The "node"
// helper runs a Spawner of its own with a contained "sleep" and is
// SIGKILLed; nothing else (no lifeline, no guardian, no marker) ends the
// namespace.
func TestPIDNSInitDiesWithNode(t *testing.T) {
	mustPIDNS(t)
	namespaceDiesWithNode(t, helperCmd("pidns-node"), 2)
}

// namespaceDiesWithNode starts cmd, a "node" helper (pidns-node,
// cgroup-node) whose worker's namespace holds want processes, SIGKILLs it,
// and fails the test unless the namespace is empty within a second. It
// returns how long that took.
func namespaceDiesWithNode(t *testing.T, cmd *exec.Cmd, want int) time.Duration {
	t.Helper()
	s := mustSpawner(t)
	out := &lines{}
	node, err := Start(s, cmd, StartOptions{Stdout: out.add, Stderr: out.add})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(node.Kill)
	waitFor(t, "the worker's init", 10*time.Second, func() bool { return len(out.pids("worker")) == 1 })
	init := out.pids("worker")[0]
	waitFor(t, "the namespace's processes", 5*time.Second, func() bool { return len(nsMembers(t, init)) == want })
	members := nsMembers(t, init)
	t.Cleanup(func() { killIdentities(members) })
	at := time.Now()
	node.Kill()
	waitFor(t, "the namespace to die with its node", time.Second, func() bool {
		for _, id := range members {
			if id.Alive() {
				return false
			}
		}
		return true
	})
	return time.Since(at)
}

// TestPIDNSInitReapsOrphans: a process orphaned inside the namespace
// becomes the init's child, and the init reaps it when it dies; the
// namespace lives on while the worker does.
func TestPIDNSInitReapsOrphans(t *testing.T) {
	s := mustSpawner(t)
	p, out := startContained(t, s, mustPIDNS(t), "orphaner")
	// "orphaner" announces itself, then runs "middle", which starts a
	// "sleep" (announced too) and exits without waiting for it.
	waitFor(t, "two pids", 5*time.Second, func() bool { return len(out.pids("pid")) == 2 })
	var orphan Identity
	waitFor(t, "the orphan re-parented to the init", 5*time.Second, func() bool {
		for _, id := range nsMembers(t, p.PID()) {
			st, err := readStat(id.PID)
			if err == nil && nsPID(t, id.PID) == out.pids("pid")[1] && st.ppid == p.PID() {
				orphan = id
				return true
			}
		}
		return false
	})
	proc, err := os.FindProcess(orphan.PID) // a pidfd: this process or none
	if err != nil {
		t.Fatal(err)
	}
	if orphan.Alive() {
		_ = proc.Kill()
	}
	_ = proc.Release()
	waitFor(t, "the init to reap the orphan", 5*time.Second, func() bool {
		_, err := readStat(orphan.PID)
		return errors.Is(err, ErrNoProcess)
	})
	select {
	case <-p.Done():
		t.Fatalf("the worker ended with its orphan: %v", p.Exit())
	default:
	}
}

func TestPIDNSPrepareRefuses(t *testing.T) {
	c := mustPIDNS(t)
	for name, attr := range map[string]*syscall.SysProcAttr{
		"namespaces": {Cloneflags: syscall.CLONE_NEWNET | syscall.CLONE_NEWPID},
		"credential": {Credential: &syscall.Credential{Uid: 1}},
	} {
		cmd := exec.Command("true")
		cmd.SysProcAttr = attr
		if _, err := c.Prepare(cmd, Marker{}); !errors.Is(err, ErrBadCommand) {
			t.Errorf("%s: Prepare: %v, want ErrBadCommand", name, err)
		}
	}
	// A program that is not there fails Start as it would uncontained.
	s := mustSpawner(t)
	cmd := exec.Command("/nonexistent/python")
	if _, err := Start(s, cmd, StartOptions{Contain: c}); err == nil || !strings.Contains(err.Error(), "/nonexistent/python") {
		t.Errorf("Start of a missing program: %v", err)
	}
}

// TestPIDNSAsOtherUser runs the probe and a contained helper as a
// throwaway user: without root the init needs a user namespace.
func TestPIDNSAsOtherUser(t *testing.T) {
	uid, gid := testkit.OtherUser(t)
	// The test binary must be reachable by that user: go test builds it
	// under a 0700 temp dir of root's.
	dir, err := os.MkdirTemp("", "pidns-user-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := dir + "/lifecycle.test"
	data, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	s := mustSpawner(t)
	out := &lines{}
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=pidns-node", "GORACE=atexit_sleep_ms=0")
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
	node, err := Start(s, cmd, StartOptions{Stdout: out.add, Stderr: out.add})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(node.Kill)
	waitFor(t, "the worker's init", 10*time.Second, func() bool {
		select {
		case <-node.Done():
			t.Fatalf("the node as uid %d exited: %v: %q", uid, node.Exit(), out.get())
		default:
		}
		return len(out.pids("worker")) == 1
	})
	init := out.pids("worker")[0]
	waitFor(t, "the namespace's two processes", 5*time.Second, func() bool { return len(nsMembers(t, init)) == 2 })
	members := nsMembers(t, init)
	t.Cleanup(func() { killIdentities(members) })
	for _, id := range members {
		st, err := os.Stat("/proc/" + strconv.Itoa(id.PID))
		if err != nil {
			t.Fatal(err)
		}
		if owner := st.Sys().(*syscall.Stat_t).Uid; owner != uint32(uid) {
			t.Errorf("pid %d runs as uid %d, want %d", id.PID, owner, uid)
		}
	}
	// The helper reports what it sees of itself inside: its own uid, a
	// /proc/self that is its pid, and no capability (the init's are not
	// passed on).
	waitFor(t, "the helper's report", 5*time.Second, func() bool {
		return slices.ContainsFunc(out.get(), func(s string) bool { return strings.HasPrefix(s, "caps ") })
	})
	got := out.get()
	pid := out.pids("pid")
	if len(pid) != 1 {
		t.Fatalf("report %q", got)
	}
	for _, want := range []string{"uid " + strconv.Itoa(uid), "self " + strconv.Itoa(pid[0]), "caps 0000000000000000"} {
		if !slices.Contains(got, want) {
			t.Errorf("report %q lacks %q", got, want)
		}
	}
	node.Kill()
	waitFor(t, "the namespace to die with its node", time.Second, func() bool {
		for _, id := range members {
			if id.Alive() {
				return false
			}
		}
		return true
	})
}

// BenchmarkSpawnToReady measures what the containment adds to a start: from
// Start to the first output line of /bin/echo, and on to Done. The init is
// this test binary, unless PYFLEET_BENCH_INIT names another build of
// InitMain (bin/poolnode: the one a node really re-executes).
func BenchmarkSpawnToReady(b *testing.B) {
	s := NewSpawner()
	defer s.Close()
	pidns, err := NewPIDNSContainment(Marker{Node: "n", Run: "r"})
	if err != nil {
		b.Fatal(err)
	}
	if exe := os.Getenv("PYFLEET_BENCH_INIT"); exe != "" {
		pidns.(*pidnsContainment).exe = exe
	}
	for _, c := range []Containment{GroupContainment(), pidns} {
		b.Run(c.Mode(), func(b *testing.B) {
			var toReady time.Duration
			for b.Loop() {
				ready := make(chan struct{}, 1)
				start := time.Now()
				p, err := Start(s, exec.Command("/bin/echo", "ready"), StartOptions{Contain: c, Stdout: func([]byte) { ready <- struct{}{} }})
				if err != nil {
					b.Fatal(err)
				}
				<-ready
				toReady += time.Since(start)
				<-p.Done()
			}
			b.ReportMetric(float64(toReady.Microseconds())/float64(b.N)/1e3, "ms-to-ready")
		})
	}
}

// TestPIDNSTreeRSSLeavesOutInit: a contained worker's memory is its own
// tree's, without the init that runs it.
func TestPIDNSTreeRSSLeavesOutInit(t *testing.T) {
	s := mustSpawner(t)
	p, out := startContained(t, s, mustPIDNS(t), "tree")
	waitFor(t, "three announced pids", 5*time.Second, func() bool { return len(out.pids("pid")) == 3 })
	stats, err := scanStats()
	if err != nil {
		t.Fatal(err)
	}
	var child int
	for _, st := range stats {
		if st.ppid == p.PID() {
			child = st.pid
		}
	}
	initRSS, err := readRSS(p.PID())
	if err != nil || child == 0 {
		t.Fatalf("init RSS %d (%v), child %d", initRSS, err, child)
	}
	whole, err := TreeRSS(p.PID())
	if err != nil {
		t.Fatal(err)
	}
	below, err := TreeRSS(child)
	if err != nil {
		t.Fatal(err)
	}
	// The helpers sleep, so their RSS holds still; the init's is several MB.
	diff := int64(whole) - int64(below)
	if diff < -(1<<20) || diff > 1<<20 {
		t.Errorf("TreeRSS(init) = %d, TreeRSS(its child) = %d: the init's own %d counted?", whole, below, initRSS)
	}
	if isNamespaceInit(child) || !isNamespaceInit(p.PID()) {
		t.Errorf("isNamespaceInit: child %v, init %v", isNamespaceInit(child), isNamespaceInit(p.PID()))
	}
}

// denyNewPIDNamespaces installs, for every thread of this process, a
// seccomp filter that fails clone(2) with CLONE_NEWPID with EPERM, as a
// container runtime's default profile does.
func denyNewPIDNamespaces() error {
	var arch uint32
	switch runtime.GOARCH {
	case "amd64":
		arch = unix.AUDIT_ARCH_X86_64
	case "arm64":
		arch = unix.AUDIT_ARCH_AARCH64
	default:
		return fmt.Errorf("no seccomp filter for %s", runtime.GOARCH)
	}
	const (
		ld   = unix.BPF_LD | unix.BPF_W | unix.BPF_ABS
		jeq  = unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K
		jset = unix.BPF_JMP | unix.BPF_JSET | unix.BPF_K
		ret  = unix.BPF_RET | unix.BPF_K
	)
	// struct seccomp_data: nr at 0, arch at 4, args[0] at 16 (its low
	// half on these little-endian machines).
	filter := []unix.SockFilter{
		{Code: ld, K: 4},
		{Code: jeq, Jt: 1, Jf: 0, K: arch},
		{Code: ret, K: unix.SECCOMP_RET_ALLOW},
		{Code: ld, K: 0},
		{Code: jeq, Jt: 0, Jf: 3, K: uint32(unix.SYS_CLONE)},
		{Code: ld, K: 16},
		{Code: jset, Jt: 0, Jf: 1, K: unix.CLONE_NEWPID},
		{Code: ret, K: unix.SECCOMP_RET_ERRNO | uint32(unix.EPERM)},
		{Code: ret, K: unix.SECCOMP_RET_ALLOW},
	}
	prog := unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("no_new_privs: %w", err)
	}
	if _, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, unix.SECCOMP_FILTER_FLAG_TSYNC, uintptr(unsafe.Pointer(&prog))); errno != 0 {
		return fmt.Errorf("seccomp: %w", errno)
	}
	return nil
}

// TestPIDNSUnavailableUnderSeccomp: a host that refuses new PID namespaces
// gets an error wrapping ErrContainmentUnavailable that says why.
func TestPIDNSUnavailableUnderSeccomp(t *testing.T) {
	out, err := helperCmd("pidns-seccomp").CombinedOutput()
	if err != nil {
		t.Fatalf("helper: %v: %s", err, out)
	}
	got := string(out)
	for _, want := range []string{"unavailable true:", "operation not permitted", "a seccomp filter is in force"} {
		if !strings.Contains(got, want) {
			t.Errorf("NewPIDNSContainment under seccomp: %q lacks %q", got, want)
		}
	}
}
