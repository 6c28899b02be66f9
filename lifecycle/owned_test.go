package lifecycle

import (
	"errors"
	"maps"
	"testing"
	"time"
)

// startMarked starts a helper as worker start m would be, and makes sure it
// and every pid it announces are gone at the end of the test.
func startMarked(t *testing.T, s *Spawner, mode string, m Marker) (*Process, *lines) {
	t.Helper()
	out := &lines{}
	p, err := Start(s, helperCmd(mode), StartOptions{Stdout: out.add, Stderr: out.add, Marker: m})
	if err != nil {
		t.Fatalf("Start %s: %v", mode, err)
	}
	t.Cleanup(func() {
		p.Kill()
		killIdentities(identities(out.pids("pid")))
	})
	return p, out
}

func TestRunProcessesCountsWholeTrees(t *testing.T) {
	s := mustSpawner(t)
	run := Marker{Node: "n", Run: uniqueRun(t)}
	at := func(worker string) Marker { m := run; m.Worker = worker; return m }

	// Marked all the way down: the worker, its child, its grandchild.
	_, tree := startMarked(t, s, "tree", at("w1-1"))
	// The worker and two children with a fresh environment: one in its
	// group, one in a session of its own (found by its parent).
	_, clean := startMarked(t, s, "clean-children", at("w2-2"))
	// The worker and a marked child that left with setsid.
	_, escape := startMarked(t, s, "escape", at("w3-3"))
	// Another run's worker and its children: never counted.
	_, other := startMarked(t, s, "clean-children", Marker{Node: "n", Run: uniqueRun(t) + "o", Worker: "w1-1"})
	waitFor(t, "every helper's pids", 10*time.Second, func() bool {
		return len(tree.pids("pid")) == 3 && len(clean.pids("pid")) == 3 &&
			len(escape.pids("pid")) == 2 && len(other.pids("pid")) == 3
	})

	got, err := RunProcesses(run)
	if err != nil {
		t.Fatal(err)
	}
	if want := map[string]int{"w1-1": 3, "w2-2": 3, "w3-3": 2}; !maps.Equal(got, want) {
		t.Errorf("RunProcesses = %v, want %v", got, want)
	}
}

func TestRunProcessesDropsWhatDied(t *testing.T) {
	s := mustSpawner(t)
	run := Marker{Node: "n", Run: uniqueRun(t), Worker: "w1-1"}
	p, out := startMarked(t, s, "clean-children", run)
	waitFor(t, "the helper's pids", 10*time.Second, func() bool { return len(out.pids("pid")) == 3 })
	if got, err := RunProcesses(run); err != nil || got["w1-1"] != 3 {
		t.Fatalf("RunProcesses = %v, %v; want w1-1:3", got, err)
	}
	// The worker's end kills its group; the setsid child is left, unmarked
	// and re-parented: nothing ties it to the run any more (see
	// RunProcesses), so it is not counted.
	p.Kill()
	if got, err := RunProcesses(run); err != nil || len(got) != 0 {
		t.Errorf("RunProcesses after the worker's end = %v, %v; want nothing", got, err)
	}
}

func TestRunProcessesNeedsARun(t *testing.T) {
	if _, err := RunProcesses(Marker{Node: "n"}); !errors.Is(err, ErrInvalidName) {
		t.Errorf("RunProcesses without a run = %v, want ErrInvalidName", err)
	}
}

// BenchmarkRunProcesses is the cost of one scrape's count: one pass over
// every process on the host.
func BenchmarkRunProcesses(b *testing.B) {
	run := Marker{Node: "n", Run: "bench"}
	for b.Loop() {
		if _, err := RunProcesses(run); err != nil {
			b.Fatal(err)
		}
	}
}
