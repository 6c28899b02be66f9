package node

import (
	"context"
	"time"

	"go.uber.org/zap"

	"github.com/pyfleet/pyfleet/lifecycle"
)

// drain stops a serving node gracefully: node_stopping; new calls get 503
// at once; accepted calls and jobs get ShutdownGrace to finish; the workers
// are stopped; the service waits for its last handlers; whatever still
// carries this run's marker is killed; node_stopped. Closing abort ends the
// grace at once and kills the workers. The closers it runs early are no-ops
// when close gets to them; close then stops the rest.
func (n *node) drain() {
	n.notReady("draining")
	n.log.Info("draining", zap.Duration("grace", n.cfg.ShutdownGrace))
	n.events(lifecycle.Event{Kind: lifecycle.KindNodeStopping, Run: n.run})
	n.svc.Drain()
	n.finishAccepted()
	// The pool before the service: stopping the workers ends the calls
	// still running past the grace, so the service's handlers can return.
	n.stopWorkers()
	n.stopService()
	n.killLeftovers()
	n.events(lifecycle.Event{Kind: lifecycle.KindNodeStopped, Run: n.run})
	n.log.Info("stopped")
}

// finishAccepted waits, at most ShutdownGrace and no longer than abort
// stays open, for the running jobs and the accepted calls to finish.
func (n *node) finishAccepted() {
	ctx, cancel := graceCtx(n.cfg.ShutdownGrace, n.abort)
	defer cancel()
	if n.jobs != nil {
		if err := n.jobs.Stop(ctx); err != nil {
			n.log.Warn("jobs did not finish within the grace", zap.Error(err))
		}
	}
	if err := n.pool.Drain(ctx); err != nil {
		n.log.Warn("in-flight calls did not finish within the grace", zap.Error(err))
	}
}

// closePool stops every worker and waits until they and everything of the
// pool's are gone. Closed abort, before or during, kills the workers at
// once instead of granting them their stop grace; they are still reaped
// before closePool returns.
func (n *node) closePool() {
	if isClosed(n.abort) {
		n.pool.Abort()
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		n.pool.Close()
	}()
	select {
	case <-done:
	case <-n.abort:
		n.pool.Abort()
		<-done
	}
}

// graceCtx returns a ctx that ends after grace, or as soon as abort is
// closed. Its cancel also stops and waits for the goroutine that watches
// abort.
func graceCtx(grace time.Duration, abort <-chan struct{}) (context.Context, func()) {
	ctx, cancel := context.WithTimeout(context.Background(), grace)
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		select {
		case <-abort:
			cancel()
		case <-ctx.Done():
		}
	}()
	return ctx, func() {
		cancel()
		<-watched
	}
}

func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}
