package lifecycle

import (
	"context"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
)

// runReaper runs r until the end of the test.
func runReaper(t *testing.T, r *Reaper) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { _ = r.Run(ctx) })
	t.Cleanup(func() {
		cancel()
		wg.Wait()
	})
}

// TestReaperStatsSeparatesStartFromPeriodic: what the sweep before Run
// kills counts as at start, what Run's sweeps kill as periodic, and every
// kill is still reported as an event.
func TestReaperStatsSeparatesStartFromPeriodic(t *testing.T) {
	dir := t.TempDir()
	s := mustSpawner(t)
	reg := mustRegistry(t, dir)
	var events eventLog
	r, err := NewReaper(ReaperConfig{StateDir: dir, Registry: reg, Events: events.add, Interval: 50 * time.Millisecond, Logger: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}

	first, ids := startFakeNode(t, s, dir, Marker{Node: "dead1", Run: uniqueRun(t)})
	first.Kill()
	if err := r.Sweep(); err != nil {
		t.Fatal(err)
	}
	if got := r.Stats(); got.AtStart < int64(len(ids)) || got.Periodic != 0 {
		t.Fatalf("after the start sweep: %+v, want %d or more at start", got, len(ids))
	}

	runReaper(t, r)
	// A run that dies while this one runs: only a periodic sweep finds
	// what it left (its fake node has no guardian).
	second, ids2 := startFakeNode(t, s, dir, Marker{Node: "dead2", Run: uniqueRun(t)})
	if got := r.Stats(); got.Periodic != 0 {
		t.Fatalf("periodic sweeps killed %d processes of a live run", got.Periodic)
	}
	second.Kill()
	// A process killed but not yet gone may be killed (and reported) twice
	// by one sweep, so the counts are checked against the events.
	runEvents := func(node string) int64 {
		n := int64(0)
		for _, ev := range events.get() {
			if ev.Node == node && ev.Kind == KindOrphanReaped {
				n++
			}
		}
		return n
	}
	waitFor(t, "a periodic sweep", 10*time.Second, func() bool {
		for _, id := range ids2 {
			if id.Alive() {
				return false
			}
		}
		got := r.Stats()
		return got.Periodic >= int64(len(ids2)) && got.Periodic == runEvents("dead2")
	})
	if got := r.Stats(); got.AtStart != runEvents("dead1") {
		t.Errorf("at start %d, want the %d events of the start sweep", got.AtStart, runEvents("dead1"))
	}
}

// TestReaperStatsLeaveOutAdoptedOrphans: an orphan adopted by the node and
// killed by Run is reported, but it is not a sweep's find.
func TestReaperStatsLeaveOutAdoptedOrphans(t *testing.T) {
	if err := SetChildSubreaper(); err != nil {
		t.Skip("no child subreaper here:", err)
	}
	dir := t.TempDir()
	s := mustSpawner(t)
	var events eventLog
	r, err := NewReaper(ReaperConfig{StateDir: dir, Registry: mustRegistry(t, dir), Events: events.add, Spawner: s,
		AdoptInterval: 20 * time.Millisecond, Logger: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	// Zombies other tests left behind since this process became a subreaper.
	if _, err := s.ReapAdopted(nil); err != nil {
		t.Fatal(err)
	}

	startOrphan(t) // unmarked, of a helper we started ourselves

	runReaper(t, r)
	waitFor(t, "the orphan's kill", 10*time.Second, func() bool { return len(events.get()) == 1 })
	if got := r.Stats(); got != (ReaperStats{}) {
		t.Errorf("stats after an adopted orphan's kill: %+v, want none", got)
	}
}
