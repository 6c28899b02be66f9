package pool

import (
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/pyfleet/pyfleet/lifecycle"
)

// fakeLimiter stands in for a cgroup with the memory controller, which
// this test machine's cgroup v2 does not have: it hands the pool what the
// kernel would (memory.current, memory.events' oom_kill) and records the
// limits the pool asked for. The processes are real.
type fakeLimiter struct {
	mu     sync.Mutex
	limits []lifecycle.Limits
	memory atomic.Uint64
	oom    atomic.Int32
}

func (f *fakeLimiter) Mode() string                       { return "fake" }
func (f *fakeLimiter) CheckLimits(lifecycle.Limits) error { return nil }
func (f *fakeLimiter) Prepare(cmd *exec.Cmd, m lifecycle.Marker) (lifecycle.Container, error) {
	return f.PrepareLimited(cmd, m, lifecycle.Limits{})
}

func (f *fakeLimiter) PrepareLimited(_ *exec.Cmd, _ lifecycle.Marker, lim lifecycle.Limits) (lifecycle.Container, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.limits = append(f.limits, lim)
	return fakeBox{f}, nil
}

type fakeBox struct{ f *fakeLimiter }

func (fakeBox) Kill() error              { return nil }
func (fakeBox) Release() error           { return nil }
func (b fakeBox) Memory() (uint64, bool) { return b.f.memory.Load(), true }
func (b fakeBox) OOMKills() int          { return int(b.f.oom.Load()) }

// The worker limits reach every start's container; --max-memory goes by
// the container's count where it keeps one (a small worker whose cgroup
// says 1 GB is recycled at a 500 MB limit); a worker whose tree the OOM
// killer ended is terminated with reason oom, not counted a crash.
func TestContainerLimitsMemoryAndOOM(t *testing.T) {
	f := &fakeLimiter{}
	p, rec := startPool(t, func(c *Config) {
		c.Containment = f
		c.WorkerMemoryLimit = 256 << 20
		c.WorkerPidsLimit = 64
		c.MaxMemory = 500 << 20
		c.MemoryInterval = 20 * time.Millisecond
	})
	f.mu.Lock()
	if len(f.limits) != 1 || f.limits[0] != (lifecycle.Limits{Memory: 256 << 20, Pids: 64}) {
		t.Errorf("limits asked for: %+v", f.limits)
	}
	f.mu.Unlock()

	f.memory.Store(1 << 30)
	rec.waitFor(t, "recycle by the container's memory", isRecycle)
	f.memory.Store(0)

	// Replacements started while the count was high are recycled too;
	// wait for one that stays.
	var pid int
	waitUntil(t, func() bool {
		before := p.Workers()["w1"]
		time.Sleep(200 * time.Millisecond)
		pid = p.Workers()["w1"]
		return pid != 0 && pid == before && p.Stats().Workers == 1
	})
	f.oom.Store(1) // the kernel OOM-killed the tree...
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	rec.waitFor(t, "terminated oom", func(e lifecycle.Event) bool {
		return e.Kind == lifecycle.KindTerminated && e.Reason == lifecycle.ReasonOOM && e.PID == pid && e.Signal == "SIGKILL"
	})
	if countEvents(rec, func(e lifecycle.Event) bool { return e.Kind == lifecycle.KindCrashed && e.PID == pid }) != 0 {
		t.Error("an OOM kill was also reported as a crash")
	}
	f.oom.Store(0)
	// Replaced: by a restart, or, when a recycle asked for while the
	// memory count was high raced the kill, by the recycle's replacement.
	waitUntil(t, func() bool {
		next := p.Workers()["w1"]
		return next != 0 && next != pid
	})
}

// Limits need a containment that enforces them.
func TestLimitsNeedALimiter(t *testing.T) {
	s := lifecycle.NewSpawner()
	defer s.Close()
	_, err := New(Config{Python: "python3", App: "app", AppDir: ".", SocketDir: ".", Node: "n", Run: "r",
		Spawner: s, WorkerPidsLimit: 10, Containment: lifecycle.GroupContainment()})
	if err == nil || !strings.Contains(err.Error(), "WorkerPidsLimit") {
		t.Errorf("New with a pids limit in group mode: %v", err)
	}
}
