package pool

import (
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Frames travel in batches both ways; a batch of large results must still
// fit what the node takes in one message, and every call gets its own.
func TestBatchesOfLargeFrames(t *testing.T) {
	p, _ := startPool(t, func(c *Config) { c.Concurrency = 8 })
	big := `"` + strings.Repeat("x", 2<<20) + `"` // 2 MB of JSON each way
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			res, err := callFn(p, 30*time.Second, "echo", big)
			if err != nil {
				t.Errorf("echo of 2 MB: %v", err)
				return
			}
			if len(res.Data) != len(big) {
				t.Errorf("echo of 2 MB: %d bytes back", len(res.Data))
			}
		})
	}
	wg.Wait()
}

// Many small calls at once share messages; each still gets its own answer.
func TestManySmallCallsAtOnce(t *testing.T) {
	p, _ := startPool(t, func(c *Config) { c.Workers = 2; c.Concurrency = 16 })
	var wg sync.WaitGroup
	for g := range 32 {
		wg.Go(func() {
			for i := range 50 {
				payload := `{"g":` + strconv.Itoa(g) + `,"i":` + strconv.Itoa(i) + `}`
				res, err := callFn(p, 30*time.Second, "echo", payload)
				if err != nil || string(res.Data) != payload {
					t.Errorf("echo %s: %q %v", payload, res.Data, err)
					return
				}
			}
		})
	}
	wg.Wait()
}

// While a long call runs on a worker, short calls on the same worker are not
// held back: neither by the node (which holds frames while the worker is
// busy with its last message) nor by the worker's call threads (one of
// which is asleep in the long call).
func TestShortCallsBesideALongOne(t *testing.T) {
	p, _ := startPool(t, func(c *Config) { c.Concurrency = 4 })
	p50 := func() time.Duration {
		var lats []time.Duration
		for i := range 60 {
			t0 := time.Now()
			if _, err := callFn(p, 5*time.Second, "echo", strconv.Itoa(i)); err != nil {
				t.Fatalf("echo %d: %v", i, err)
			}
			lats = append(lats, time.Since(t0))
		}
		slices.Sort(lats)
		return lats[len(lats)/2]
	}
	alone := p50()
	long := make(chan error, 1)
	go func() {
		_, err := callFn(p, 30*time.Second, "sleep", "3000")
		long <- err
	}()
	time.Sleep(200 * time.Millisecond) // the long call is in the worker
	beside := p50()
	if beside > alone+1500*time.Microsecond {
		t.Errorf("echo p50 %v beside a long call, %v alone", beside, alone)
	}
	if err := <-long; err != nil {
		t.Errorf("long call: %v", err)
	}
}
