package lifecycle

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
	"go.uber.org/goleak"
)

// helperEnv selects a fake child: the test binary re-executed in one of the
// modes of runHelper (go-plugin's helperProcess pattern), so the tests need
// no Python and no shell.
const helperEnv = "LIFECYCLE_TEST_HELPER"

func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == GuardianArg {
		os.Exit(GuardianMain(os.Args[2:], os.Stdin, os.Stderr))
	}
	if len(os.Args) > 1 && os.Args[1] == InitArg {
		os.Exit(InitMain(os.Args[2:]))
	}
	if mode := os.Getenv(helperEnv); mode != "" {
		os.Exit(runHelper(mode))
	}
	// The inits of ModePIDNS are this binary too, started without
	// helperCmd: under -race each would sleep a second at exit.
	os.Setenv("GORACE", "atexit_sleep_ms=0")
	goleak.VerifyTestMain(m)
}

// runHelper is the body of a fake child. Every mode that lives on first
// prints "pid <pid>" so the test learns the pids of a whole tree.
func runHelper(mode string) int {
	announce := func() { fmt.Printf("pid %d\n", os.Getpid()) }
	forever := func() int { time.Sleep(time.Hour); return 0 }
	switch mode {
	case "sleep":
		announce()
		return forever()
	case "ignore-term":
		signal.Ignore(syscall.SIGTERM)
		announce()
		return forever()
	case "tree", "tree-child":
		// A child and a grandchild without Pdeathsig, as Python's
		// multiprocessing would leave them: only the group kill reaches them.
		next := map[string]string{"tree": "tree-child", "tree-child": "sleep"}[mode]
		announce()
		if err := helperChild(next, nil).Start(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 3
		}
		return forever()
	case "tree-ignore", "tree-ignore-child":
		signal.Ignore(syscall.SIGTERM)
		next := map[string]string{"tree-ignore": "tree-ignore-child", "tree-ignore-child": "ignore-term"}[mode]
		announce()
		if err := helperChild(next, nil).Start(); err != nil {
			return 3
		}
		return forever()
	case "escape":
		// A child that leaves the group with setsid and keeps the pipes.
		announce()
		if err := helperChild("sleep", &syscall.SysProcAttr{Setsid: true}).Start(); err != nil {
			return 3
		}
		return forever()
	case "clean-children":
		// Two children started with a fresh environment, as a worker's
		// subprocess.Popen(env={...}) would: one in its group, one in a
		// session of its own. Neither carries the marks.
		announce()
		for _, attr := range []*syscall.SysProcAttr{nil, {Setsid: true}} {
			child := helperChild("sleep", attr)
			child.Env = []string{helperEnv + "=sleep", "GORACE=atexit_sleep_ms=0"}
			if err := child.Start(); err != nil {
				return 3
			}
		}
		return forever()
	case "clean-child", "clean-escape":
		// A child with a clean environment (no marker), as
		// subprocess.Popen(cmd, env={"PATH": ...}) starts one: in the
		// group, or in a session of its own too.
		announce()
		child := helperChild("sleep", nil)
		child.Env = []string{helperEnv + "=sleep", "GORACE=atexit_sleep_ms=0"}
		if mode == "clean-escape" {
			child.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		}
		if err := child.Start(); err != nil {
			return 3
		}
		return forever()
	case "lines":
		fmt.Println("out 1")
		fmt.Println("out 2")
		fmt.Println(strings.Repeat("x", maxLine+10))
		fmt.Fprintln(os.Stderr, "err 1")
		fmt.Print("no newline")
		return 0
	case "exit7":
		return 7
	case "self-hup":
		// No handler: the runtime dies of the signal, as a process would.
		_ = syscall.Kill(os.Getpid(), syscall.SIGHUP)
		return forever()
	case "self-kill":
		_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
		return forever()
	case "fds":
		// Writes to the pipes it was given as fds 3 and 4, and checks that
		// it was given nothing more.
		for _, fd := range []int{3, 4} {
			if _, err := syscall.Write(fd, []byte(fmt.Sprintf("fd %d", fd))); err != nil {
				fmt.Fprintf(os.Stderr, "fd %d: %v\n", fd, err)
				return 3
			}
		}
		// The runtime opens fds of its own, but no pipe.
		fds, _ := os.ReadDir("/proc/self/fd")
		for _, e := range fds {
			if fd, _ := strconv.Atoi(e.Name()); fd > 4 {
				if link, _ := os.Readlink("/proc/self/fd/" + e.Name()); strings.HasPrefix(link, "pipe:") {
					fmt.Printf("fd %d is a %s\n", fd, link)
				}
			}
		}
		fmt.Fprintln(os.Stderr, "stderr line")
		return 0
	case "whoami":
		// What a contained process sees of itself.
		announce()
		self, _ := os.Readlink("/proc/self")
		status, _ := os.ReadFile("/proc/self/status")
		caps := "?"
		for line := range strings.SplitSeq(string(status), "\n") {
			if v, ok := strings.CutPrefix(line, "CapEff:\t"); ok {
				caps = v
			}
		}
		fmt.Printf("uid %d\nself %s\ncaps %s\n", os.Getuid(), self, caps)
		return forever()
	case "pidns-seccomp":
		// A container runtime's default seccomp profile, in short: clone
		// with CLONE_NEWPID fails with EPERM.
		if err := denyNewPIDNamespaces(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 3
		}
		_, err := NewPIDNSContainment(Marker{Node: "n", Run: "r"})
		fmt.Printf("unavailable %v: %v\n", errors.Is(err, ErrContainmentUnavailable), err)
		return 0
	case "pidns-node", "cgroup-node":
		// A supervisor with a contained worker: the test SIGKILLs it and
		// checks that the worker's namespace dies with it. pidns-node's
		// worker is "whoami"; cgroup-node's, in ModeCgroup (and its PID
		// namespaces) for the run LIFECYCLE_TEST_RUN, leaves a
		// clean-environment escapee.
		m, worker := Marker{Node: "n", Run: "r"}, "whoami"
		newContainment := NewPIDNSContainment
		if mode == "cgroup-node" {
			m.Run, worker, newContainment = os.Getenv("LIFECYCLE_TEST_RUN"), "clean-escape", NewCgroupContainment
		}
		c, err := newContainment(m)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 3
		}
		if mode == "cgroup-node" {
			m.Worker = "w1"
		} else {
			m = Marker{}
		}
		p, err := Start(NewSpawner(), helperCmd(worker), StartOptions{Marker: m, Contain: c, Stdout: func(b []byte) { fmt.Println(string(b)) }})
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 3
		}
		fmt.Printf("worker %d\n", p.PID())
		return forever()
	case "middle":
		// Starts a child in a group of its own and exits without waiting
		// for it: the child is orphaned and re-parented to the nearest
		// subreaper.
		if err := helperChild("sleep", &syscall.SysProcAttr{Setpgid: true}).Start(); err != nil {
			return 3
		}
		return 0
	case "orphaner":
		announce()
		if err := helperChild("middle", nil).Run(); err != nil {
			return 3
		}
		return forever()
	case "fakenode":
		return fakeNode()
	case "registry-put":
		reg, err := OpenRegistry(os.Getenv("REG_PATH"))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 3
		}
		for i := range 20 {
			rec := Record{Node: "n", Run: "r", Worker: os.Getenv("REG_PREFIX") + strconv.Itoa(i), State: StateStarting}
			if err := reg.Put(rec); err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 3
			}
		}
		return 0
	case "node":
		// A supervisor of its own: the test SIGKILLs it and checks that its
		// worker dies with it.
		s := NewSpawner()
		p, err := Start(s, helperCmd("sleep"), StartOptions{})
		if err != nil {
			return 3
		}
		fmt.Printf("worker %d\n", p.PID())
		return forever()
	}
	fmt.Fprintln(os.Stderr, "unknown helper mode", mode)
	return 2
}

// fakeNode plays a node that used the state dir in FAKENODE_STATE: it holds
// its run's lock, records one worker, and starts it the way no real node
// would, without Pdeathsig, so that the worker outlives it. The worker is a
// "tree" (child and grandchild in its group); beside it runs a marked
// escapee in a session of its own. All carry the run's marker. It prints
// "ready" and waits to be killed.
func fakeNode() int {
	fail := func(err error) int { fmt.Fprintln(os.Stderr, "fakenode:", err); return 3 }
	dir, m := os.Getenv("FAKENODE_STATE"), Marker{Node: os.Getenv("FAKENODE_NODE"), Run: os.Getenv("FAKENODE_RUN"), Worker: "w1"}
	lock, err := AcquireNodeLock(dir, m.Node, m.Run)
	if err != nil {
		return fail(err)
	}
	defer lock.Release() // never reached: the test kills this process
	reg, err := OpenRegistry(filepath.Join(dir, "registry.db"))
	if err != nil {
		return fail(err)
	}
	rec := Record{Node: m.Node, Run: m.Run, Worker: m.Worker, Pool: "p", State: StateStarting}
	if err := reg.Put(rec); err != nil {
		return fail(err)
	}
	// Their "pid" lines reach the test through this process's output.
	worker := helperCmd("tree")
	worker.Stdout = os.Stdout
	worker.Env = append(worker.Env, m.Env()...)
	worker.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := worker.Start(); err != nil {
		return fail(err)
	}
	id, err := ReadIdentity(worker.Process.Pid)
	if err != nil {
		return fail(err)
	}
	rec.PID, rec.PGID, rec.StartTime, rec.BootID, rec.State = id.PID, id.PID, id.StartTime, id.BootID, StateRunning
	if err := reg.Put(rec); err != nil {
		return fail(err)
	}
	escapee := helperCmd("sleep")
	escapee.Stdout = os.Stdout
	escapee.Env = append(escapee.Env, m.Env()...)
	escapee.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := escapee.Start(); err != nil {
		return fail(err)
	}
	fmt.Println("ready")
	time.Sleep(time.Hour)
	return 0
}

// helperCmd returns a command that runs the test binary as a fake child.
func helperCmd(mode string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	// The race detector otherwise sleeps a second before a helper exits.
	cmd.Env = append(os.Environ(), helperEnv+"="+mode, "GORACE=atexit_sleep_ms=0")
	return cmd
}

// helperChild is helperCmd for a helper's own children: they share its
// output, so their "pid" lines reach the test too.
func helperChild(mode string, attr *syscall.SysProcAttr) *exec.Cmd {
	cmd := helperCmd(mode)
	cmd.Stdout, cmd.Stderr, cmd.SysProcAttr = os.Stdout, os.Stderr, attr
	return cmd
}

// lines collects output lines from a Process's callbacks.
type lines struct {
	mu    sync.Mutex
	lines []string
}

func (l *lines) add(b []byte) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines = append(l.lines, string(b))
}

func (l *lines) get() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.lines...)
}

// readLinesOf collects the lines cmd (not started by Start) writes on its
// stdout, until every process holding the pipe is gone; the reader is
// waited for at the end of the test.
func readLinesOf(t *testing.T, cmd *exec.Cmd) *lines {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	out := &lines{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer r.Close()
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			out.add(sc.Bytes())
		}
	}()
	cmd.Stdout = w
	t.Cleanup(func() {
		w.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			r.Close()
			<-done
		}
	})
	return out
}

// pids returns the pids announced so far with the given prefix ("pid").
func (l *lines) pids(prefix string) []int {
	var out []int
	for _, s := range l.get() {
		if rest, ok := strings.CutPrefix(s, prefix+" "); ok {
			if pid, err := strconv.Atoi(rest); err == nil {
				out = append(out, pid)
			}
		}
	}
	return out
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// mustSpawner returns a Spawner closed at the end of the test.
func mustSpawner(t *testing.T) *Spawner {
	t.Helper()
	s := NewSpawner()
	t.Cleanup(s.Close)
	return s
}

// mustStart starts a helper and makes sure it and every pid it announces are
// gone at the end of the test, whatever the test did.
func mustStart(t *testing.T, s *Spawner, mode string) (*Process, *lines) {
	t.Helper()
	out := &lines{}
	p, err := Start(s, helperCmd(mode), StartOptions{Stdout: out.add, Stderr: out.add})
	if err != nil {
		t.Fatalf("Start %s: %v", mode, err)
	}
	t.Cleanup(func() {
		p.Kill()
		killIdentities(identities(out.pids("pid")))
		killIdentities(identities(out.pids("worker")))
	})
	return p, out
}

// identities reads the identities of pids that are still alive.
func identities(pids []int) []Identity {
	var ids []Identity
	for _, pid := range pids {
		if id, err := ReadIdentity(pid); err == nil {
			ids = append(ids, id)
		}
	}
	return ids
}

// killIdentities is the tests' own cleanup: it kills only processes whose
// identity still matches.
func killIdentities(ids []Identity) {
	for _, id := range ids {
		if id.Alive() {
			_ = syscall.Kill(id.PID, syscall.SIGKILL)
		}
	}
}

func waitDone(t *testing.T, p *Process, d time.Duration) {
	t.Helper()
	select {
	case <-p.Done():
	case <-time.After(d):
		t.Fatalf("process %d not done after %v", p.PID(), d)
	}
}

// stamped is rec as Put stores it from this process.
func stamped(t *testing.T, rec Record) Record {
	t.Helper()
	self, err := ReadIdentity(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	rec.NodePID, rec.NodeStartTime, rec.NodeBootID = self.PID, self.StartTime, self.BootID
	return rec
}

// putRaw stores rec as it is, without Put's node identity: a record written
// by another process (or by an older version, which wrote none).
func putRaw(t *testing.T, reg *Registry, rec Record) {
	t.Helper()
	v, err := json.Marshal(rec)
	if err != nil {
		t.Fatal(err)
	}
	if err := reg.update(func(b *bolt.Bucket) error { return b.Put(rec.key(), v) }); err != nil {
		t.Fatal(err)
	}
}

// deadIdentity is the identity of a process that has exited and been reaped.
func deadIdentity(t *testing.T) Identity {
	t.Helper()
	cmd := helperCmd("exit7")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	id, err := ReadIdentity(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	return id
}
