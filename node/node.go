package node

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/nats-io/nats.go"
	"go.uber.org/zap"

	"github.com/pyfleet/pyfleet/bus"
	"github.com/pyfleet/pyfleet/lifecycle"
	"github.com/pyfleet/pyfleet/metrics"
	"github.com/pyfleet/pyfleet/pool"
)

// Version is reported by the micro service.
const Version = "0.1.0"

// Run runs a node until ctx ends, then drains it: no new calls or jobs,
// in-flight work gets ShutdownGrace to finish, every worker and everything
// it started is stopped, node_stopped is published. Closing abort (a second
// signal) cuts the drain short and kills the workers at once; they are still
// reaped before Run returns.
//
// Errors that wrap ErrConfig mean the configuration or the app is wrong.
func Run(ctx context.Context, cfg Config, log *zap.Logger, abort <-chan struct{}) error {
	// The interpreter's import check runs beside the start, and is waited
	// for only before the first worker (startPool).
	cfg.deferImportCheck = true
	err := cfg.Validate()
	// Also when a later part of Validate failed after the check started.
	defer cfg.importCheck.stop()
	if err != nil {
		return err
	}
	n := &node{
		cfg:    cfg,
		run:    randomHex(4),
		log:    log.With(zap.String("node", cfg.Node), zap.String("pool", cfg.Pool)),
		abort:  abort,
		status: newStatusState(),
		// A few reloads may wait for the one running; more are refused
		// rather than queued without bound.
		reloads: make(chan *nats.Msg, 4),
	}
	n.log.Info("interpreter", zap.String("python", cfg.Python), zap.String("from", cfg.PythonFrom),
		zap.String("app", cfg.App), zap.String("app_dir", cfg.AppDir))
	// Each phase pushes a closer for everything it opens, as it opens it;
	// close undoes them last first, however far the phases got.
	defer n.close()
	for _, phase := range []func(context.Context) error{
		n.serveMetrics, // /metrics and /healthz, served until Run returns
		n.openState,    // state dir, socket dir, lock, containment, registry, subreaper
		n.connect,      // NATS or the embedded server, events, node_started
		n.startReaping, // spawner, dead runs' leftovers, the reaper, the guardian
		n.startPool,    // the workers, ready
		n.serve,        // rate limits, the micro service, the jobs consumers, status and control
	} {
		if err := phase(ctx); err != nil {
			if errors.Is(err, errStopped) {
				return nil
			}
			return err
		}
	}
	// A drain request (status.go) stops the node as a signal does.
	select {
	case <-ctx.Done():
	case <-n.status.drainCh:
	}
	n.drain() // stop.go: graceful, bounded by ShutdownGrace, cut short by abort
	return nil
}

// errStopped is returned by a phase that saw ctx end before it could
// finish: nothing is serving yet, so Run's return is a clean stop.
var errStopped = errors.New("stopped while starting")

// node is one run of Run: what its phases opened, and the closers that
// undo it.
type node struct {
	cfg   Config
	run   string // this run's id, in its markers, socket dir and lock
	log   *zap.Logger
	abort <-chan struct{}

	closers []func() // see close

	status *statusState // status.go
	// reloads are the reload requests (status.go's control) that
	// reloadOnHangup has yet to answer.
	reloads chan *nats.Msg

	metrics *metrics.Metrics       // nil without --metrics
	ready   atomic.Pointer[string] // why /healthz is not ready; nil when ready

	socketDir string
	lock      *lifecycle.NodeLock
	contain   lifecycle.Containment
	limits    lifecycle.Limits
	registry  *lifecycle.Registry
	nc        *nats.Conn
	events    lifecycle.Events
	spawner   *lifecycle.Spawner
	reaper    *lifecycle.Reaper
	guardian  *lifecycle.Guardian
	pool      *pool.Pool
	svc       *bus.Service
	jobs      *bus.Jobs // nil when the server has no JetStream

	// Closers the drain runs early, in an order of its own (stop.go); as
	// closers they run on every other way out. Each runs once.
	stopWorkers, stopService, killLeftovers func()
}

// onClose pushes fn on the closers.
func (n *node) onClose(fn func()) { n.closers = append(n.closers, fn) }

// onCloseOnce pushes fn as a closer that runs at most once, and returns it
// for the drain to run before its turn.
func (n *node) onCloseOnce(fn func()) func() {
	fn = sync.OnceFunc(fn)
	n.onClose(fn)
	return fn
}

// goUntilClose runs fn in a goroutine whose owner is a closer, pushed now:
// it cancels fn's ctx and waits for fn to return.
func (n *node) goUntilClose(fn func(ctx context.Context)) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn(ctx)
	}()
	n.onClose(func() {
		cancel()
		<-done
	})
}

// close runs the closers last first, each once: a second close does
// nothing.
func (n *node) close() {
	for len(n.closers) > 0 {
		last := len(n.closers) - 1
		fn := n.closers[last]
		n.closers = n.closers[:last]
		fn()
	}
}

// notReady makes /healthz answer not ready, saying why.
func (n *node) notReady(why string) { n.ready.Store(&why) }

// readiness is /healthz's answer.
func (n *node) readiness() (bool, string) {
	if why := n.ready.Load(); why != nil {
		return false, *why
	}
	return true, ""
}

// logContainment is the startup line that says how the workers' trees are
// kept: the mode asked for (--containment), the mode in use, whether a
// cgroup's workers also get PID namespaces and, when the mode is not the
// strongest, why each stronger mode was passed over.
func logContainment(log *zap.Logger, asked string, c lifecycle.Containment, passedOver []string) {
	fields := []zap.Field{zap.String("mode", c.Mode()), zap.String("asked", asked)}
	if ns, ok := c.(interface{ PIDNamespaces() error }); ok {
		pidns := "yes"
		if err := ns.PIDNamespaces(); err != nil {
			pidns = "no: " + err.Error()
		}
		fields = append(fields, zap.String("pid_namespaces", pidns))
	}
	if len(passedOver) > 0 {
		fields = append(fields, zap.Strings("passed_over", passedOver))
	}
	log.Info("containment", fields...)
}

// workerProcesses counts the live processes of run's workers' trees by
// worker: a worker's starts are named <worker>-<n> (pool/worker.go), and a
// recycled worker briefly has two.
func workerProcesses(node, run string) (map[string]int, error) {
	byStart, err := lifecycle.RunProcesses(lifecycle.Marker{Node: node, Run: run})
	if err != nil {
		return nil, err
	}
	out := make(map[string]int, len(byStart))
	for start, n := range byStart {
		worker := start
		if i := strings.LastIndexByte(start, '-'); i > 0 {
			worker = start[:i]
		}
		out[worker] += n
	}
	return out, nil
}

// checkLimits refuses, naming the flag, a worker limit the containment
// cannot enforce.
func checkLimits(c lifecycle.Containment, lim lifecycle.Limits) error {
	for _, f := range []struct {
		flag string
		lim  lifecycle.Limits
	}{
		{"--worker-memory-limit", lifecycle.Limits{Memory: lim.Memory}},
		{"--worker-pids-limit", lifecycle.Limits{Pids: lim.Pids}},
	} {
		if f.lim.IsZero() {
			continue
		}
		l, ok := c.(lifecycle.Limiter)
		if !ok {
			return fmt.Errorf("%w: %s needs cgroup containment with its controller; the containment is %s", ErrConfig, f.flag, c.Mode())
		}
		if err := l.CheckLimits(f.lim); err != nil {
			return fmt.Errorf("%w: %s: %v", ErrConfig, f.flag, err)
		}
	}
	return nil
}
