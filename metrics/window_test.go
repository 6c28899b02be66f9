package metrics

import (
	"fmt"
	"testing"
	"time"
)

func TestWindowFigures(t *testing.T) {
	now := time.Unix(1000, 0)
	w := NewWindow(time.Minute)
	w.now = func() time.Time { return now }
	for i := 1; i <= 100; i++ {
		w.Observe("f", 200, time.Duration(i)*time.Millisecond)
	}
	w.Observe("f", 500, time.Millisecond)
	w.Observe("g", 200, time.Second)
	// A minute later only what came after counts as recent; totals stay.
	now = now.Add(2 * time.Minute)
	w.Observe("g", 200, 3*time.Second)
	s := w.Snapshot()
	f := s["f"]
	if f.Calls != 101 || f.Errors["500"] != 1 || f.Recent != 0 || f.P50Ms != 0 {
		t.Fatalf("f = %+v", f)
	}
	g := s["g"]
	if g.Calls != 2 || g.Recent != 1 || g.P50Ms != 3000 || g.P99Ms != 3000 || g.Errors != nil {
		t.Fatalf("g = %+v", g)
	}
	now = now.Add(-2 * time.Minute) // back: everything of f is recent
	w2 := NewWindow(time.Minute)
	w2.now = func() time.Time { return now }
	for i := 1; i <= 100; i++ {
		w2.Observe("f", 200, time.Duration(i)*time.Millisecond)
	}
	f = w2.Snapshot()["f"]
	if f.Recent != 100 || f.P50Ms != 50 || f.P99Ms != 99 || f.Rate != 100.0/60 {
		t.Fatalf("f = %+v", f)
	}
}

func TestWindowBoundedMemory(t *testing.T) {
	now := time.Unix(1000, 0)
	w := NewWindow(time.Minute)
	w.now = func() time.Time { return now }
	for i := range 3 * windowSamples {
		now = now.Add(time.Millisecond)
		w.Observe("f", 200, time.Duration(i))
	}
	f := w.Snapshot()["f"]
	if f.Calls != 3*windowSamples || f.Recent != windowSamples {
		t.Fatalf("f = %+v", f)
	}
	// The ring held the last 2048 ms: the rate is over those, not the minute.
	if f.Rate < 900 || f.Rate > 1100 {
		t.Fatalf("rate %v, want about 1000/s", f.Rate)
	}
}

func TestWindowBoundedNames(t *testing.T) {
	w := NewWindow(time.Minute)
	for i := range 1000 {
		w.Observe(fmt.Sprintf("made_up_%d", i), 404, time.Millisecond)
	}
	for i := range MaxFunctions + 10 {
		w.Observe(fmt.Sprintf("f%d", i), 200, time.Millisecond)
	}
	got := w.Snapshot()
	if len(got) != MaxFunctions+1 {
		t.Fatalf("%d names kept, want %d (the first %d, then %q)", len(got), MaxFunctions+1, MaxFunctions, OtherFunction)
	}
	if got[UnknownFunction].Calls != 1000 || got[UnknownFunction].Errors["404"] != 1000 {
		t.Fatalf("%s = %+v, want the 1000 calls of made-up names", UnknownFunction, got[UnknownFunction])
	}
	if got[OtherFunction].Calls != 11 {
		t.Fatalf("%s = %+v, want the 11 calls past the bound", OtherFunction, got[OtherFunction])
	}
}
