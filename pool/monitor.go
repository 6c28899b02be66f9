package pool

import (
	"context"
	"math/rand/v2"
	"time"

	"go.uber.org/zap"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/pyfleet/pyfleet/lifecycle"
)

// jitter spreads a limit up to 10% above n, so that workers started together
// do not all recycle together.
func jitter[T ~int64 | ~int](n T) T {
	if n <= 0 {
		return n
	}
	return n + T(rand.Int64N(int64(n)/10+1))
}

// askRecycle asks the worker's supervisor to replace it; asking twice is
// asking once.
func (w *worker) askRecycle(why string) {
	select {
	case w.recycle <- why:
	default:
	}
}

// watch checks one worker on a timer until it goes away: its age, and its
// health (a worker that stops answering health checks is killed and
// replaced; its calls fail at once rather than at their deadlines). Checks
// that fail while the worker runs a sync call on its event loop do not
// count.
// Request counts are checked as calls end, memory by watchMemory.
func (p *Pool) watch(w *worker) {
	maxAge := jitter(p.cfg.MaxAge)
	health := healthpb.NewHealthClient(w.conn)
	tick := time.NewTicker(p.cfg.HealthInterval)
	defer tick.Stop()
	failures := 0
	for {
		select {
		case <-w.lost:
			return
		case <-w.retire:
			return
		case <-tick.C:
		}
		if maxAge > 0 && time.Since(w.started) > maxAge {
			w.askRecycle("age")
		}
		ctx, cancel := context.WithTimeout(p.ctx, p.cfg.HealthTimeout)
		_, err := health.Check(ctx, &healthpb.HealthCheckRequest{})
		cancel()
		if err == nil {
			failures = 0
			continue
		}
		if p.isClosed() {
			return
		}
		if w.calls.inlineBusy.Load() > 0 {
			// The worker runs a sync function on its event loop
			// (--concurrency 1) and answers nothing until it returns:
			// busy, not hung. The call's deadline bounds the wait: past
			// it, plus the grace, the worker is killed.
			continue
		}
		failures++
		p.log.Warn("worker health check failed", zap.String("worker", w.name), zap.Int("failures", failures), zap.Error(err))
		if failures >= p.cfg.HealthFailures {
			w.stopProcess(lifecycle.ReasonUnhealthy, 0)
			return
		}
	}
}

// watchMemory recycles workers whose process tree's memory passed
// MaxMemory: what its container counts (memory.current: page cache and
// kernel memory included, everything in its cgroup whatever its parent),
// else its tree's resident memory, for which one /proc scan covers every
// worker, so the check can run often enough to catch a leak before the OOM
// killer does.
func (p *Pool) watchMemory() {
	tick := time.NewTicker(p.cfg.MemoryInterval)
	defer tick.Stop()
	for {
		select {
		case <-p.closed:
			return
		case <-tick.C:
		}
		p.mu.Lock()
		byPID := make(map[int]*worker, len(p.workers))
		pids := make([]int, 0, len(p.workers))
		used := make(map[int]uint64, len(p.workers))
		for _, w := range p.workers {
			byPID[w.proc.PID()] = w
			if bytes, ok := w.proc.Memory(); ok {
				used[w.proc.PID()] = bytes
			} else {
				pids = append(pids, w.proc.PID())
			}
		}
		p.mu.Unlock()
		if len(pids) > 0 {
			rss, err := lifecycle.TreeRSSOf(pids)
			if err != nil {
				p.log.Warn("memory check", zap.Error(err))
				continue
			}
			for pid, bytes := range rss {
				used[pid] = bytes
			}
		}
		for pid, bytes := range used {
			if bytes > p.cfg.MaxMemory {
				w := byPID[pid]
				p.log.Info("worker over its memory limit", zap.String("worker", w.name),
					zap.Uint64("bytes", bytes), zap.Uint64("limit", p.cfg.MaxMemory))
				w.askRecycle("memory")
			}
		}
	}
}
