package pool

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"go.uber.org/zap"

	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/lifecycle"
	"github.com/pyfleet/pyfleet/proto/workerpb"
	"github.com/pyfleet/pyfleet/protocol"
)

// Config says how to run a pool. Zero values take the defaults noted.
type Config struct {
	Python      string // interpreter; required
	App         string // MODULE[:ATTR]; required
	AppDir      string // put on the worker's sys.path; required
	SocketDir   string // private (0700) directory for worker sockets; required
	Node, Run   string // identity of this node and this run of it; required
	Workers     int    // default 1
	Concurrency int    // calls in flight per worker; default 1
	QueueLimit  int    // calls waiting for a worker before 503; default 1000
	// QueueLimitBytes caps the payload bytes of the calls waiting for a
	// worker (503 beyond); default 256 MB.
	QueueLimitBytes int64
	// MaxSessions caps the sessions remembered at once (a new one gets 503
	// beyond); default 10,000.
	MaxSessions int

	// StartTimeout bounds a worker's start, from spawn to handshake; default 60 s.
	StartTimeout time.Duration
	// StopGrace is how long a stopped worker may take between SIGTERM and
	// SIGKILL; default 5 s.
	StopGrace time.Duration
	// DeadlineGrace is how long a call may overrun its deadline before its
	// worker is killed; default 2 s.
	DeadlineGrace time.Duration
	// RestartBackoff is the first delay before restarting a crashed worker;
	// it doubles up to MaxRestartBackoff (defaults 100 ms and 30 s).
	RestartBackoff, MaxRestartBackoff time.Duration
	// CrashLoop is how many failed starts or early deaths in a row make a
	// crash_loop event; default 5.
	CrashLoop int

	// Recycling: a worker is replaced after about MaxRequests calls, MaxAge
	// of life, or when its process tree's memory passes MaxMemory bytes
	// (each off when zero): its container's count where it keeps one
	// (memory.current of a cgroup with the memory controller), else the
	// RSS of its tree. MaxRequests and MaxAge get up to 10% jitter per
	// worker start, so that workers started together do not recycle
	// together; MaxMemory is exact.
	MaxRequests int
	MaxAge      time.Duration
	MaxMemory   uint64
	// MemoryInterval is how often memory is checked; default 500 ms.
	MemoryInterval time.Duration

	// Health: every HealthInterval (default 5 s) each worker gets a gRPC
	// health check with HealthTimeout (default 2 s); HealthFailures (default
	// 3) failures in a row and it is killed and replaced.
	HealthInterval time.Duration
	HealthTimeout  time.Duration
	HealthFailures int

	Pool     string              // for registry records
	Registry *lifecycle.Registry // may be nil: workers are then not recorded
	Spawner  *lifecycle.Spawner  // required
	// Containment keeps each worker's tree (lifecycle.Containment); nil is
	// lifecycle.ModeGroup.
	Containment lifecycle.Containment
	// WorkerMemoryLimit (bytes) and WorkerPidsLimit are hard limits on each
	// worker's whole tree, enforced by the kernel (0: none); they need a
	// Containment that is a lifecycle.Limiter accepting them. A worker
	// whose tree the OOM killer ends is terminated with reason oom.
	WorkerMemoryLimit uint64
	WorkerPidsLimit   int
	// Guardian, if set, is told every worker's process group, to kill it
	// if the node dies (lifecycle.StartOptions.Guardian).
	Guardian *lifecycle.Guardian
	// Preload forks workers from a template that imported the app once
	// (pool/preload.go); where that cannot be done safely workers start
	// plainly, and the log says why.
	Preload bool
	// BeforeWorkers, if set, is waited for once the template (if any) has
	// started and before the first worker starts; an error ends Start
	// with it. The node checks its interpreter there, beside the
	// template's own import.
	BeforeWorkers func(context.Context) error
	Events        lifecycle.Events // may be nil
	Logger        *zap.Logger      // may be nil

	// sessionIdle is how long an unused session is kept (default 1 h) and
	// sessionSweep how often idle ones are looked for (default 1 min); tests
	// shorten them.
	sessionIdle, sessionSweep time.Duration
	// stableAfter is how long a worker must have served before it crashed
	// or lost its channel for the failure not to count towards crash_loop
	// (default 1 min); tests shorten it.
	stableAfter time.Duration
}

func (c *Config) validate() error {
	for _, req := range []struct{ name, val string }{
		{"Python", c.Python}, {"App", c.App}, {"AppDir", c.AppDir},
		{"SocketDir", c.SocketDir}, {"Node", c.Node}, {"Run", c.Run},
	} {
		if req.val == "" {
			return fmt.Errorf("pool: %s is required", req.name)
		}
	}
	if c.Spawner == nil {
		return errors.New("pool: Spawner is required")
	}
	if c.Workers < 0 || c.Concurrency < 0 || c.QueueLimit < 0 || c.QueueLimitBytes < 0 || c.MaxSessions < 0 ||
		c.MaxRequests < 0 || c.MaxAge < 0 || c.WorkerPidsLimit < 0 {
		return errors.New("pool: Workers, Concurrency, QueueLimit, QueueLimitBytes, MaxSessions, MaxRequests, MaxAge and WorkerPidsLimit must not be negative")
	}
	if lim := c.limits(); !lim.IsZero() {
		l, ok := c.Containment.(lifecycle.Limiter)
		if !ok {
			return fmt.Errorf("pool: WorkerMemoryLimit and WorkerPidsLimit need a containment that enforces them (lifecycle.Limiter)")
		}
		if err := l.CheckLimits(lim); err != nil {
			return fmt.Errorf("pool: %w", err)
		}
	}
	setDefault(&c.Workers, 1)
	setDefault(&c.Concurrency, 1)
	setDefault(&c.QueueLimit, 1000)
	setDefault(&c.QueueLimitBytes, 256<<20)
	setDefault(&c.MaxSessions, 10_000)
	setDefault(&c.sessionIdle, time.Hour)
	setDefault(&c.sessionSweep, time.Minute)
	setDefault(&c.stableAfter, time.Minute)
	setDefault(&c.CrashLoop, 5)
	setDefault(&c.StartTimeout, 60*time.Second)
	setDefault(&c.StopGrace, 5*time.Second)
	setDefault(&c.DeadlineGrace, 2*time.Second)
	setDefault(&c.RestartBackoff, 100*time.Millisecond)
	setDefault(&c.MaxRestartBackoff, 30*time.Second)
	setDefault(&c.MemoryInterval, 500*time.Millisecond)
	setDefault(&c.HealthInterval, 5*time.Second)
	setDefault(&c.HealthTimeout, 2*time.Second)
	setDefault(&c.HealthFailures, 3)
	if c.Logger == nil {
		c.Logger = zap.NewNop()
	}
	return nil
}

// limits are the hard limits of each worker's tree.
func (c *Config) limits() lifecycle.Limits {
	return lifecycle.Limits{Memory: c.WorkerMemoryLimit, Pids: c.WorkerPidsLimit}
}

func setDefault[T comparable](v *T, def T) {
	var zero T
	if *v == zero {
		*v = def
	}
}

// Pool runs Config.Workers Python workers and dispatches calls to them.
// It implements call.Handler.
type Pool struct {
	cfg Config
	log *zap.Logger

	// slots hands the workers' call slots to the calls; a call waits for
	// one in its own goroutine, where its deadline and the queue limit are
	// checked, and runs on it there.
	slots   dispatcher
	waiting atomic.Int64
	// waitingBytes is the payload bytes of the calls counted in waiting.
	waitingBytes atomic.Int64

	// ctx ends when the pool closes; it bounds worker starts.
	ctx    context.Context
	cancel context.CancelFunc
	// draining is closed when the pool takes no new calls; closed when its
	// workers go away and waiting calls are answered 503.
	draining  chan struct{}
	closed    chan struct{}
	closeOnce sync.Once
	aborted   chan struct{}
	abortOnce sync.Once

	goroutines sync.WaitGroup // every goroutine the pool started
	spawnSeq   atomic.Uint64
	pre        preload

	fnMu      sync.RWMutex
	functions []call.Function
	fnIndex   map[string]call.Function

	mu      sync.Mutex
	active  int           // accepted calls not yet answered
	drained chan struct{} // closed when active drops to 0 during a drain
	isDrain bool
	workers map[string]*worker // the serving worker of each slot name
	// procs holds every served worker until its process is reaped: a
	// worker leaves workers when its channel breaks, before its process
	// is gone, and Abort must still reach it.
	procs    map[*worker]struct{}
	sessions map[string]*session

	busy    atomic.Int64
	handled atomic.Uint64
	errors  atomic.Uint64
}

type session struct {
	worker   *worker
	lastUsed time.Time
}

// New checks cfg and returns a pool that has not started any worker.
func New(cfg Config) (*Pool, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Pool{
		cfg:      cfg,
		log:      cfg.Logger,
		slots:    dispatcher{perW: cfg.Concurrency},
		ctx:      ctx,
		cancel:   cancel,
		draining: make(chan struct{}),
		closed:   make(chan struct{}),
		aborted:  make(chan struct{}),
		workers:  make(map[string]*worker),
		procs:    make(map[*worker]struct{}),
		sessions: make(map[string]*session),
	}, nil
}

// Start spawns every worker and returns once each has either become ready or
// failed its first start. If the app cannot be loaded, or the interpreter's
// pyfleet speaks another worker protocol, it stops the pool and returns the
// *AppError or *RuntimeError; if no worker started at all it returns the first
// error. Workers that failed are retried in the background.
func (p *Pool) Start(ctx context.Context) error {
	first := make(chan error, p.cfg.Workers)
	if p.cfg.MaxMemory > 0 {
		p.goroutines.Add(1)
		go func() {
			defer p.goroutines.Done()
			p.watchMemory()
		}()
	}
	p.goroutines.Add(1)
	go func() {
		defer p.goroutines.Done()
		p.sweepSessions()
	}()
	p.startPreload()
	if p.cfg.BeforeWorkers != nil {
		if err := p.cfg.BeforeWorkers(ctx); err != nil {
			p.Close()
			return err
		}
	}
	for i := range p.cfg.Workers {
		name := "w" + strconv.Itoa(i+1)
		p.goroutines.Add(1)
		go func() {
			defer p.goroutines.Done()
			p.supervise(name, first)
		}()
	}
	var firstErr error
	ok := 0
	for range p.cfg.Workers {
		select {
		case err := <-first:
			if err == nil {
				ok++
				continue
			}
			if fatalStartError(err) {
				p.Close()
				return err
			}
			if firstErr == nil {
				firstErr = err
			}
		case <-ctx.Done():
			p.Close()
			return ctx.Err()
		}
	}
	if ok == 0 {
		p.Close()
		return firstErr
	}
	return nil
}

// supervise keeps one worker slot filled until the pool closes. It reports
// the outcome of the first start on first.
func (p *Pool) supervise(name string, first chan<- error) {
	backoff := p.cfg.RestartBackoff
	failures := 0
	var prevPID int
	var w *worker // the slot's live worker; nil when one must be started
	for {
		if w == nil {
			var err error
			w, err = p.spawnWorker(p.ctx, name)
			if err == nil {
				if prevPID != 0 {
					p.emit(lifecycle.Event{Kind: lifecycle.KindRestarted, Worker: name, PID: w.proc.PID(), PGID: w.proc.PGID(),
						Detail: "replaces pid " + strconv.Itoa(prevPID)})
				}
				prevPID = w.proc.PID()
				// Serving before Start hears of it: once Start
				// returns, Workers, Idle and Stats count it.
				p.serve(w)
			} else if !p.isClosed() {
				p.log.Warn("worker failed to start", zap.String("worker", name), zap.Error(err))
				p.emit(lifecycle.Event{Kind: lifecycle.KindSpawnFailed, Worker: name, Detail: err.Error()})
			}
			if first != nil {
				first <- err
				if fatalStartError(err) {
					return // the node gives up; Start says why
				}
				first = nil
			}
			if err != nil {
				if p.isClosed() {
					return
				}
				failures++
				if !p.sleepBackoff(name, &backoff, failures) {
					return
				}
				continue
			}
		}

		select {
		case <-w.proc.Done():
		case <-p.closed:
			p.stopForClose(w)
		case <-w.lost:
			p.settleLost(w)
		case why := <-w.recycle:
			if next := p.replace(w, why); next != nil {
				prevPID, w = next.proc.PID(), next
			}
			continue
		}
		p.retireWorker(w)
		if p.isClosed() || p.isAborted() {
			return
		}
		if why := w.stoppedFor(); why != "" && why != lifecycle.ReasonChannelLost {
			// Killed on purpose (deadline, health): replace now.
			failures, backoff, w = 0, p.cfg.RestartBackoff, nil
			continue
		}
		// A crash, or a channel lost. What broke the channel (a result
		// too large to send, a socket closed under the worker) may well
		// break the next one too, so a loss backs off and counts towards
		// crash_loop like a crash. A worker that served for a while
		// before either is not looping.
		if time.Since(w.started) > p.cfg.stableAfter {
			failures, backoff = 0, p.cfg.RestartBackoff
		}
		w = nil
		failures++
		if !p.sleepBackoff(name, &backoff, failures) {
			return
		}
	}
}

func (p *Pool) stopForClose(w *worker) {
	grace := p.cfg.StopGrace
	if p.isAborted() {
		grace = 0
	}
	w.stopProcess(lifecycle.ReasonStop, grace)
}

// exitWait is how long a worker whose channel broke may take to be seen
// exiting before it is called a channel loss. When a process dies (kill -9)
// the kernel closes its socket a moment before the process turns into a
// zombie, so its stream breaks first; that is still a crash.
const exitWait = 500 * time.Millisecond

// settleLost handles w's channel breaking (w.lost) before its exit was seen.
// A worker the pool is stopping on purpose already has its reason; one whose
// process exits within exitWait crashed; one whose process lives on can
// serve no call, so it is killed with its group and replaced (reason
// channel_lost). The supervisor then retires it as any other.
func (p *Pool) settleLost(w *worker) {
	if w.stoppedFor() != "" {
		return
	}
	if p.exitsSoon(w) {
		return
	}
	if p.isClosed() {
		p.stopForClose(w)
		return
	}
	p.log.Warn("worker's channel to the node broke while its process lives; killing it",
		zap.String("worker", w.name), zap.Int("pid", w.proc.PID()), zap.Error(w.lostCause()))
	w.stopProcess(lifecycle.ReasonChannelLost, 0)
}

// exitsSoon reports whether w's process exits (or is stopped on purpose)
// within exitWait. It watches the process's state in /proc, not only Done:
// Done also waits for the process's group and output readers, which can
// take longer than the exit itself.
func (p *Pool) exitsSoon(w *worker) bool {
	limit := time.NewTimer(exitWait)
	defer limit.Stop()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	id := w.proc.Identity()
	for {
		// The pid cannot name another process yet: it is reaped only
		// after it exits, and Identity checks the start time too.
		if !id.Alive() || w.stoppedFor() != "" {
			return true
		}
		select {
		case <-w.proc.Done():
			return true
		case <-p.closed:
			return false
		case <-limit.C:
			return false
		case <-tick.C:
		}
	}
}

// replace recycles old: a new worker is started and serving before old stops
// taking calls, and old finishes the calls it has before it is stopped, so
// recycling fails no call. If the new worker cannot start, old keeps serving
// and replace returns nil; its monitor asks again later.
func (p *Pool) replace(old *worker, why string) *worker {
	next, err := p.spawnWorker(p.ctx, old.name)
	if err != nil {
		if !p.isClosed() {
			p.log.Warn("recycle: replacement failed to start; the old worker keeps serving",
				zap.String("worker", old.name), zap.Error(err))
			p.emit(lifecycle.Event{Kind: lifecycle.KindSpawnFailed, Worker: old.name, Detail: err.Error()})
		}
		return nil
	}
	p.log.Info("recycling worker", zap.String("worker", old.name), zap.String("why", why),
		zap.Int("old_pid", old.proc.PID()), zap.Int("new_pid", next.proc.PID()))
	p.serve(next)
	old.retireOnce.Do(func() { close(old.retire) })
	p.slots.close(old)
	old.slots.Wait() // its in-flight calls are done
	old.stopProcess(lifecycle.ReasonRecycle, p.cfg.StopGrace)
	p.retireWorker(old)
	return next
}

// retireWorker cleans up after a worker whose process has exited, and says
// how it ended.
func (p *Pool) retireWorker(w *worker) {
	<-w.proc.Done()
	w.markLost(fmt.Errorf("worker %s exited", w.name))
	w.conn.Close()
	p.unregister(w)
	p.mu.Lock()
	delete(p.procs, w)
	p.mu.Unlock()
	w.slots.Wait()
	w.monitor.Wait()
	p.reportExit(w)
}

// sleepBackoff waits before the next start, with jitter so that workers that
// died together do not restart together. It returns false if the pool closed.
func (p *Pool) sleepBackoff(name string, backoff *time.Duration, failures int) bool {
	if failures == p.cfg.CrashLoop {
		p.log.Error("worker is crash-looping", zap.String("worker", name), zap.Int("failures", failures))
		p.emit(lifecycle.Event{Kind: lifecycle.KindCrashLoop, Worker: name,
			Detail: strconv.Itoa(failures) + " failed starts or crashes in a row"})
	}
	d := *backoff/2 + rand.N(*backoff/2+1)
	*backoff = min(*backoff*2, p.cfg.MaxRestartBackoff)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-p.closed:
		return false
	}
}

func (p *Pool) reportExit(w *worker) {
	st := w.proc.Exit()
	ev := lifecycle.Event{Worker: w.name, PID: w.proc.PID(), PGID: w.proc.PGID(), Signal: st.Signal}
	if st.Signal == "" {
		code := st.Code
		ev.ExitCode = &code
	}
	reason := w.stoppedFor()
	if st.OOMKilled {
		// The kernel ended the tree, over WorkerMemoryLimit: on purpose,
		// as far as the operator is concerned, whatever the pool was doing.
		reason = lifecycle.ReasonOOM
	}
	if reason != "" {
		ev.Kind, ev.Reason = lifecycle.KindTerminated, reason
		p.log.Info("worker terminated", zap.String("worker", w.name), zap.String("reason", reason), zap.String("exit", exitText(st)))
	} else {
		ev.Kind = lifecycle.KindCrashed
		p.log.Warn("worker crashed", zap.String("worker", w.name), zap.String("exit", exitText(st)))
	}
	p.emit(ev)
}

func exitText(st lifecycle.ExitStatus) string {
	if st.Signal != "" {
		return "signal " + st.Signal
	}
	return "exit code " + strconv.Itoa(st.Code)
}

// serve registers a ready worker and opens its slots to calls. A worker
// whose channel broke already is not registered (see markLost); its
// supervisor sees w.lost.
func (p *Pool) serve(w *worker) {
	p.mu.Lock()
	p.procs[w] = struct{}{}
	if !w.isBroken() {
		p.workers[w.name] = w
		p.slots.open(w)
	}
	p.mu.Unlock()
	w.monitor.Add(1)
	p.goroutines.Add(1)
	go func() {
		defer p.goroutines.Done()
		defer w.monitor.Done()
		p.watch(w)
	}()
}

// leaveServing takes w out of the serving set while markBroken marks its
// channel broken, both under p.mu (see worker.leave).
func (p *Pool) leaveServing(w *worker, markBroken func()) {
	p.mu.Lock()
	defer p.mu.Unlock()
	markBroken()
	if p.workers[w.name] == w {
		delete(p.workers, w.name)
	}
	p.slots.close(w)
}

func (p *Pool) unregister(w *worker) {
	p.mu.Lock()
	if p.workers[w.name] == w {
		delete(p.workers, w.name)
	}
	p.mu.Unlock()
}

// queuedCall is one accepted call on its way to, or in, a worker (the
// caller's side of it; pendingCall is the frame's, in the worker).
type queuedCall struct {
	ctx  context.Context
	req  *call.Request
	emit call.Emit

	mu        sync.Mutex
	abandoned bool // the caller answered already (deadline); emit nothing more
}

type outcome struct {
	res call.Result
	err error
}

// chunk passes one streamed item to the caller unless it has gone.
func (c *queuedCall) chunk(ch call.Chunk) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.abandoned {
		return context.DeadlineExceeded
	}
	return c.emit(ch)
}

func (c *queuedCall) isAbandoned() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.abandoned
}

func (c *queuedCall) abandon() {
	c.mu.Lock()
	c.abandoned = true
	c.mu.Unlock()
}

// execution is one call on its worker, from its frame to its END. It
// holds one of the worker's slots until end.
type execution struct {
	p       *Pool
	w       *worker
	c       *queuedCall
	id      uint64
	results <-chan *workerpb.Result
	// deadline fires at the call's deadline, then at the end of the grace
	// after it; timer is its timer, nil while none is armed.
	deadline <-chan time.Time
	timer    *time.Timer
	overran  bool // cancelled (deadline or ctx); the grace runs
}

// run sends c to w, whose slot the caller holds and counts in busy, and waits for its end on
// the caller's goroutine. Past the deadline it cancels the call; past the
// deadline plus the grace it kills the worker, because a sync Python
// function cannot be interrupted any other way. If the caller's ctx ends
// first, run answers 408 at once, and a goroutine of the pool's sees the
// call to its end (cancel frame, grace, kill) and gives the slot back.
func (p *Pool) run(w *worker, c *queuedCall) (call.Result, error) {
	if c.ctx.Err() != nil {
		p.busy.Add(-1)
		p.slots.release(w)
		return call.Result{}, deadlineError(w.name)
	}
	w.inflight.Add(1)
	x := execution{p: p, w: w, c: c, id: w.nextID.Add(1)}
	frame := &workerpb.Call{Id: x.id, Function: c.req.Function, Payload: c.req.Payload,
		RequestId: c.req.RequestID, Session: c.req.Session,
		JobId: c.req.JobID, Attempt: uint32(max(c.req.Attempt, 1))}
	if !c.req.Deadline.IsZero() {
		left := time.Until(c.req.Deadline)
		frame.TimeoutMs = timeoutMs(left)
		// When ctx ends at the deadline (the bus and jobs give it the
		// same one), its Done stops the call then: a timer of our own
		// would be a second one for the same instant.
		if d, ok := c.ctx.Deadline(); !ok || d.After(c.req.Deadline) {
			x.arm(left)
		}
	}
	var err error
	if x.results, err = w.begin(frame); err != nil {
		x.end()
		return call.Result{}, lostError(w)
	}
	if o, done := x.wait(true); done {
		x.end()
		return o.res, o.err
	}
	// The caller gave up (a deadline, a cancelled job, a node stopping):
	// it hears 408 now, and the call is stopped as the deadline would
	// stop it, the worker replaced if it outlives the grace.
	c.abandon()
	p.goroutines.Add(1)
	go func(x execution) {
		defer p.goroutines.Done()
		x.wait(false)
		x.end()
	}(x)
	return call.Result{}, call.Errorf(call.CodeDeadline, call.TypeDeadline, "the deadline passed before the call finished")
}

// timeoutMs is the frame's TimeoutMs for the time left. The field holds 32
// bits of milliseconds (49.7 days): a longer deadline is sent as the
// longest the field holds, never wrapped to a short one; the deadline ends
// the call at the real time either way.
func timeoutMs(left time.Duration) uint32 {
	return uint32(min(max(left.Milliseconds(), 1), math.MaxUint32))
}

// arm makes deadline fire after d, in place of what it was armed for.
func (x *execution) arm(d time.Duration) {
	if x.timer != nil {
		x.timer.Stop()
	}
	x.timer = time.NewTimer(d)
	x.deadline = x.timer.C
}

// end gives the slot back once the call is over.
func (x *execution) end() {
	if x.timer != nil {
		x.timer.Stop()
	}
	x.w.inflight.Add(-1)
	x.p.busy.Add(-1)
	x.p.slots.release(x.w)
}

// overrun cancels the call in the worker and starts its grace, once.
func (x *execution) overrun() {
	if !x.overran {
		x.overran = true
		x.w.cancel(x.id)
		x.arm(x.p.cfg.DeadlineGrace)
	}
}

// wait waits for the call's end and says how it ended. With caller set,
// it returns done false as soon as the caller's ctx ends, unless the end
// came at the same moment (its answer is then preferred), having sent the
// cancel frame and started the grace.
func (x *execution) wait(caller bool) (o outcome, done bool) {
	w, c := x.w, x.c
	var cancelled <-chan struct{}
	if caller {
		cancelled = c.ctx.Done()
	}
	for {
		select {
		case <-cancelled:
			x.overrun()
			for {
				select {
				case r := <-x.results:
					if o, done := x.result(r); done {
						return o, true
					}
				default:
					return outcome{}, false
				}
			}
		case r := <-x.results:
			if o, done := x.result(r); done {
				return o, true
			}
		case <-w.lost:
			x.p.errors.Add(1)
			if x.overran && errors.Is(c.ctx.Err(), context.Canceled) {
				return outcome{err: &call.Error{Code: call.CodeCancelled, Type: call.TypeCancelled,
					Message: "the call was cancelled and did not stop within the grace; its worker was replaced", Worker: w.name}}, true
			} else if x.overran {
				return outcome{err: deadlineError(w.name)}, true
			}
			return outcome{err: lostError(w)}, true
		case <-x.deadline:
			if !x.overran {
				x.overrun()
				continue
			}
			x.p.log.Warn("call overran its deadline or cancel; killing its worker",
				zap.String("worker", w.name), zap.String("function", c.req.Function), zap.String("request_id", c.req.RequestID))
			w.stopProcess(lifecycle.ReasonDeadline, 0)
			x.deadline = nil
		}
	}
}

// result takes one result of the call: progress and chunks go to the
// caller while it listens; the END is the outcome.
func (x *execution) result(r *workerpb.Result) (outcome, bool) {
	w, c, p := x.w, x.c, x.p
	switch r.Kind {
	case workerpb.Result_PROGRESS:
		if c.req.Progress != nil && !c.isAbandoned() {
			c.req.Progress(r.Payload)
		}
		return outcome{}, false
	case workerpb.Result_CHUNK:
		if err := c.chunk(call.Chunk{Worker: w.name, Data: r.Payload}); err != nil {
			w.cancel(x.id)
		}
		return outcome{}, false
	}
	if n := w.handled.Add(1); w.maxRequests > 0 && n >= w.maxRequests {
		w.askRecycle("requests")
	}
	p.handled.Add(1)
	if r.Error != nil {
		p.errors.Add(1)
		return outcome{err: &call.Error{Code: int(r.Error.Code), Type: r.Error.Type, Message: r.Error.Message, Worker: w.name}}, true
	}
	return outcome{res: call.Result{Worker: w.name, Data: r.Payload}}, true
}
func deadlineError(worker string) *call.Error {
	return &call.Error{Code: call.CodeDeadline, Type: call.TypeDeadline, Message: "the deadline passed before the call finished", Worker: worker}
}

// Functions lists the app's functions, as the first worker reported them.
func (p *Pool) Functions() []call.Function {
	p.fnMu.RLock()
	defer p.fnMu.RUnlock()
	return append([]call.Function(nil), p.functions...)
}

func (p *Pool) setFunctions(hs *handshake) {
	p.fnMu.Lock()
	defer p.fnMu.Unlock()
	if p.fnIndex != nil {
		return // every worker runs the same app; the first one tells
	}
	p.fnIndex = make(map[string]call.Function, len(hs.Functions))
	for _, f := range hs.Functions {
		fn := call.Function{Name: f.Name, Raw: f.Raw, Stream: f.Stream,
			InputSchema: schemaOf(f.InputSchema), OutputSchema: schemaOf(f.OutputSchema), RateLimit: f.RateLimit}
		p.functions = append(p.functions, fn)
		p.fnIndex[f.Name] = fn
	}
	sort.Slice(p.functions, func(a, b int) bool { return p.functions[a].Name < p.functions[b].Name })
}

// schemaOf keeps a reported schema if it is a JSON object within
// protocol.MaxSchemaBytes, compacted; the worker bounds its schemas, and a
// node must not publish what does not fit however the worker misbehaves.
func schemaOf(raw json.RawMessage) json.RawMessage {
	if len(raw) == 0 || raw[0] != '{' {
		return nil
	}
	var b bytes.Buffer
	if json.Compact(&b, raw) != nil || b.Len() > protocol.MaxSchemaBytes {
		return nil
	}
	return b.Bytes()
}

func (p *Pool) lookup(name string) (call.Function, bool) {
	p.fnMu.RLock()
	defer p.fnMu.RUnlock()
	fn, ok := p.fnIndex[name]
	return fn, ok
}

// Call runs req on a worker; see call.Handler. Time spent waiting for a free
// worker counts against the deadline in ctx.
func (p *Pool) Call(ctx context.Context, req *call.Request, emit call.Emit) (call.Result, error) {
	if field := notUTF8(req); field != "" {
		return call.Result{}, call.Errorf(call.CodeBadRequest, call.TypeBadRequest, "the %s is not valid UTF-8", field)
	}
	if _, ok := p.lookup(req.Function); !ok {
		return call.Result{}, call.Errorf(call.CodeNotFound, call.TypeNotFound, "no function %q in this app", req.Function)
	}
	if !p.enter() {
		return call.Result{}, call.Errorf(call.CodeUnavailable, call.TypeDraining, "the node is stopping; try another node")
	}
	defer p.leave()

	// Admission: the call counts against the queue's limits until a slot
	// takes it or it gives up waiting.
	size := int64(len(req.Payload))
	unwait := func() {
		p.waiting.Add(-1)
		p.waitingBytes.Add(-size)
	}
	n, held := p.waiting.Add(1), p.waitingBytes.Add(size)
	if req.Admitted != nil {
		req.Admitted()
	}
	if n > int64(p.cfg.QueueLimit) {
		unwait()
		return call.Result{}, call.Errorf(call.CodeUnavailable, call.TypeOverloaded, "%d calls are already waiting on this node (its queue limit)", p.cfg.QueueLimit)
	}
	if held > p.cfg.QueueLimitBytes {
		unwait()
		return call.Result{}, call.Errorf(call.CodeUnavailable, call.TypeOverloaded,
			"the calls waiting on this node would hold %d payload bytes, over its queue limit of %d bytes", held, p.cfg.QueueLimitBytes)
	}

	// Only an admitted call may start a session.
	var pinned *worker
	if req.Session != "" {
		w, err := p.sessionWorker(req.Session)
		if err != nil {
			unwait()
			return call.Result{}, err
		}
		pinned = w
	}
	w, err := p.acquire(ctx, pinned, req.Session)
	if err == nil {
		p.busy.Add(1) // before unwait: Idle never sees the call in neither count
	}
	unwait()
	if err != nil {
		return call.Result{}, err
	}
	return p.run(w, &queuedCall{ctx: ctx, req: req, emit: emit})
}

func (p *Pool) enter() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.isDrain {
		return false
	}
	p.active++
	return true
}

func (p *Pool) leave() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.active--
	if p.active == 0 && p.drained != nil {
		close(p.drained)
		p.drained = nil
	}
}

// notUTF8 names the field of req that is not valid UTF-8, or is "". These
// travel in the worker's frame as proto strings, which must be UTF-8: a
// frame that cannot be marshalled would break the worker's channel, so
// such a call is refused (Call) or never started (StartCall), whoever
// admitted it.
func notUTF8(req *call.Request) string {
	for _, f := range []struct{ name, val string }{
		{"function name", req.Function}, {"request id", req.RequestID}, {"session", req.Session},
	} {
		if !utf8.ValidString(f.val) {
			return f.name
		}
	}
	return ""
}

// sessionWorker returns the worker a session is bound to, binding it to the
// least busy worker on its first call, while fewer than MaxSessions are
// kept.
func (p *Pool) sessionWorker(id string) (*worker, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	if s, live := p.liveSession(id, now); s != nil {
		if !live {
			return nil, sessionLost(id, s.worker)
		}
		return s.worker, nil
	}
	var best *worker
	for _, w := range p.workers {
		if best == nil || w.inflight.Load() < best.inflight.Load() {
			best = w
		}
	}
	if best == nil {
		return nil, call.Errorf(call.CodeUnavailable, call.TypeNoWorker, "no worker is ready to take a new session")
	}
	if len(p.sessions) >= p.cfg.MaxSessions {
		return nil, call.Errorf(call.CodeUnavailable, call.TypeOverloaded,
			"this node already keeps %d sessions, its limit (max sessions); a session is forgotten after %s unused",
			p.cfg.MaxSessions, p.cfg.sessionIdle)
	}
	// A copy: id may be a piece of the request's header block, which the
	// session would otherwise keep alive for as long as it lives.
	p.sessions[strings.Clone(id)] = &session{worker: best, lastUsed: now}
	return best, nil
}

// boundSession is the live worker session id is bound to, marked used
// now; nil if the session is new or its worker is gone, which is
// sessionWorker's to answer.
func (p *Pool) boundSession(id string) *worker {
	p.mu.Lock()
	defer p.mu.Unlock()
	if s, live := p.liveSession(id, time.Now()); live {
		return s.worker
	}
	return nil
}

// liveSession is session id (nil if there is none) and whether the worker
// it is bound to still serves it; a live one is marked used at now.
// Called with mu held.
func (p *Pool) liveSession(id string, now time.Time) (s *session, live bool) {
	s = p.sessions[id]
	if s == nil || p.workers[s.worker.name] != s.worker {
		return s, false
	}
	s.lastUsed = now
	return s, true
}

// sweepSessions forgets sessions unused for sessionIdle, on a timer, until
// the pool closes: at most MaxSessions are kept, and idle ones must make
// room without waiting for a call to notice them.
func (p *Pool) sweepSessions() {
	tick := time.NewTicker(p.cfg.sessionSweep)
	defer tick.Stop()
	for {
		select {
		case <-p.closed:
			return
		case <-tick.C:
		}
		now := time.Now()
		p.mu.Lock()
		for k, s := range p.sessions {
			if now.Sub(s.lastUsed) > p.cfg.sessionIdle {
				delete(p.sessions, k)
			}
		}
		p.mu.Unlock()
	}
}

func sessionLost(id string, w *worker) *call.Error {
	return &call.Error{Code: call.CodeSessionLost, Type: call.TypeSessionLost,
		Message: fmt.Sprintf("session %q lived on worker %s, which is gone", id, w.name), Worker: w.name}
}

// Drain stops the pool taking new calls and waits until the accepted ones
// are answered or ctx ends.
func (p *Pool) Drain(ctx context.Context) error {
	p.mu.Lock()
	if !p.isDrain {
		p.isDrain = true
		close(p.draining)
	}
	if p.active == 0 {
		p.mu.Unlock()
		return nil
	}
	if p.drained == nil {
		p.drained = make(chan struct{})
	}
	drained := p.drained
	p.mu.Unlock()
	select {
	case <-drained:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Close stops every worker (SIGTERM, then SIGKILL after StopGrace) and
// waits for them and for every goroutine of the pool. Calls still waiting
// are answered 503. Safe to call more than once.
func (p *Pool) Close() {
	p.closeOnce.Do(func() {
		p.mu.Lock()
		if !p.isDrain {
			p.isDrain = true
			close(p.draining)
		}
		p.mu.Unlock()
		close(p.closed)
		p.cancel()
	})
	p.goroutines.Wait()
}

// Abort makes a Close that is under way, or the next one, kill the workers
// at once instead of granting StopGrace. It returns once the workers alive
// when it was called are dead.
func (p *Pool) Abort() {
	p.abortOnce.Do(func() { close(p.aborted) })
	p.mu.Lock()
	live := make([]*worker, 0, len(p.procs))
	for w := range p.procs {
		live = append(live, w)
	}
	p.mu.Unlock()
	var wg sync.WaitGroup
	for _, w := range live {
		// A kill on purpose: reported as terminated (reason stop), not
		// as a crash, and not restarted.
		wg.Go(func() { w.stopProcess(lifecycle.ReasonStop, 0) })
	}
	wg.Wait()
}

func (p *Pool) isAborted() bool {
	select {
	case <-p.aborted:
		return true
	default:
		return false
	}
}

func (p *Pool) isClosed() bool {
	select {
	case <-p.closed:
		return true
	default:
		return false
	}
}

func (p *Pool) emit(ev lifecycle.Event) {
	if p.cfg.Events == nil {
		return
	}
	if ev.Run == "" {
		ev.Run = p.cfg.Run
	}
	p.cfg.Events(ev)
}

// Stats is a snapshot of the pool for node listings and metrics.
type Stats struct {
	Workers int    `json:"workers"`
	Busy    int    `json:"busy"`
	Queued  int    `json:"queued"`
	Handled uint64 `json:"handled"`
	Errors  uint64 `json:"errors"`
}

// Stats returns the pool's counters now.
func (p *Pool) Stats() Stats {
	p.mu.Lock()
	n := len(p.workers)
	p.mu.Unlock()
	return Stats{
		Workers: n,
		Busy:    int(p.busy.Load()),
		Queued:  int(p.waiting.Load()),
		Handled: p.handled.Load(),
		Errors:  p.errors.Load(),
	}
}

// Idle is how many more calls the pool could start now without queueing:
// free worker slots less the calls already waiting. Jobs are pulled only
// into that room, so a node never holds jobs it cannot run.
func (p *Pool) Idle() int {
	p.mu.Lock()
	n := len(p.workers)
	p.mu.Unlock()
	// waiting before busy: a call is counted in busy before it leaves
	// waiting, so read in this order it is never missed.
	waiting := p.waiting.Load()
	return n*p.cfg.Concurrency - int(p.busy.Load()) - int(waiting)
}

// Workers lists the live workers' pids by name.
func (p *Pool) Workers() map[string]int {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[string]int, len(p.workers))
	for name, w := range p.workers {
		out[name] = w.proc.PID()
	}
	return out
}
