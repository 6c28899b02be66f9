package pool

import (
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
// held back waiting for it to answer.
func TestShortCallsBesideALongOne(t *testing.T) {
	p, _ := startPool(t, func(c *Config) { c.Concurrency = 4 })
	long := make(chan error, 1)
	go func() {
		_, err := callFn(p, 30*time.Second, "sleep", "1500")
		long <- err
	}()
	time.Sleep(200 * time.Millisecond) // the long call is in the worker
	start := time.Now()
	for i := range 20 {
		if _, err := callFn(p, 5*time.Second, "echo", strconv.Itoa(i)); err != nil {
			t.Fatalf("echo %d: %v", i, err)
		}
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("20 short calls beside a long one took %v", took)
	}
	if err := <-long; err != nil {
		t.Errorf("long call: %v", err)
	}
}
