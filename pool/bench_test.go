package pool

import (
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
)

// benchBody is the 100-byte JSON body of make bench's echo (test/bench).
var benchBody = `{"message":"` + strings.Repeat("x", 100-len(`{"message":"","n":1}`)) + `","n":1}`

// BenchmarkPoolCall is one call at a time to a real Python worker: the
// node's side of it (dispatch, frame, stream, routing) is what
// -benchmem counts, the worker being another process.
func BenchmarkPoolCall(b *testing.B) {
	p, _ := startPool(b, func(c *Config) { c.Logger = zap.NewNop() })
	b.ReportAllocs()
	for b.Loop() {
		if _, err := callFn(p, 10*time.Second, "echo", benchBody); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkPoolCallParallel keeps 16 calls in flight over 2 workers, as
// make bench's rr16 does.
func BenchmarkPoolCallParallel(b *testing.B) {
	p, _ := startPool(b, func(c *Config) {
		c.Logger = zap.NewNop()
		c.Workers = 2
		c.Concurrency = 16
	})
	b.ReportAllocs()
	b.ResetTimer() // the workers' start is not the call's
	b.SetParallelism(8)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := callFn(p, 10*time.Second, "echo", benchBody); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
