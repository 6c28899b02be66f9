package pool

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/lifecycle"
	"github.com/pyfleet/pyfleet/proto/workerpb"
)

// Environment variables the node sets on a worker, besides the lifecycle
// markers that everything the worker starts inherits. They hold fd numbers:
// the secret itself never is in the environment, where
// /proc/<pid>/environ would show it for the worker's whole life and every
// child would inherit it.
const (
	envSecretFD = "PYFLEET_WORKER_SECRET_FD"
	envLifeline = "PYFLEET_WORKER_LIFELINE_FD"
)

// maxMessageBytes is the largest message the node takes from a worker: the
// worker's own limit (python/pyfleet/servicer.py), plus room for a batch's
// other frames.
const maxMessageBytes = 65 << 20

// worker is one running Python process and its Batches stream. Its calls
// are matched to results by id.
//
// Who owns what: spawnWorker sets the fields of the first group before any
// other goroutine sees the worker, and nobody writes them after. The stream's
// receive side is recv's alone; its send side is the outbox's (see outbox).
// calls and out each guard their own state with their own mutex. The rest
// are atomics and channels that any of the worker's goroutines may use: its
// callers (Pool.run), recv, its exit watcher, its monitor (Pool.watch), and
// its supervisor (Pool.supervise), which alone retires it.
type worker struct {
	name        string // e.g. "w3", unique in the node
	start       string // this start of it, e.g. "w3-17": its socket, registry key and marker
	log         *zap.Logger
	proc        *lifecycle.Process
	conn        *grpc.ClientConn
	stream      *batchStream
	started     time.Time
	maxRequests uint64 // with jitter; 0: no limit
	// inline names the functions the worker runs on its event loop (see
	// calls.inlineBusy).
	inline map[string]bool
	// leave takes the worker out of the pool's serving set and runs
	// markBroken under the pool's lock, so that serve never registers a
	// broken worker and no caller who learns of the loss (from begin's
	// error or from lost) finds the worker still counted.
	leave func(markBroken func())

	calls callTable // the calls in flight, by frame id
	out   outbox    // frames on their way to the worker

	nextID   atomic.Uint64 // the last frame id given out
	handled  atomic.Uint64 // calls ended, for MaxRequests
	inflight atomic.Int64  // calls running on it now, for sessions

	// lost is closed when the stream breaks or the process exits: every
	// pending call fails at once rather than waiting for its deadline.
	lost     chan struct{}
	lostOnce sync.Once
	// why is the reason the pool stopped this worker on purpose (stop,
	// deadline, recycle, unhealthy); empty means it died by itself.
	why atomic.Pointer[string]
	// open and free are the pool's dispatcher's, under its mu: whether
	// calls may take the worker's slots, and how many are free.
	open bool
	free int
	// retire is closed when the worker must take no more calls.
	retire     chan struct{}
	retireOnce sync.Once
	// recycle carries the monitor's request to replace the worker (the
	// reason, for the log); buffered so the monitor never waits.
	recycle chan string
	// slots counts the calls that hold one of the worker's slots, monitor
	// its watch goroutine.
	slots   sync.WaitGroup
	monitor sync.WaitGroup
}

// callTable holds the calls sent on a worker's stream whose END has not come
// back. begin adds to it from the calls, recv takes from it, markLost breaks
// it; mu guards pending and broken.
type callTable struct {
	mu      sync.Mutex
	pending map[uint64]pendingCall
	broken  error // set once the stream failed; no call can start after

	// inlineBusy counts the pending calls the worker runs on its event
	// loop: while there is one, failed health checks say the worker is
	// busy, not hung (see Pool.watch, which reads it without mu).
	inlineBusy atomic.Int64
}

// pendingCall is a call sent to the worker whose END has not come back:
// one a goroutine waits for on ch (Pool.run), or one that recv ends itself
// (async, Pool.StartCall).
type pendingCall struct {
	ch     chan *workerpb.Result
	async  *asyncCall
	inline bool // counted in inlineBusy
}

// add registers a call, unless the stream is broken already.
func (t *callTable) add(id uint64, pc pendingCall) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.broken != nil {
		return t.broken
	}
	if pc.inline {
		t.inlineBusy.Add(1)
	}
	t.pending[id] = pc
	return nil
}

// route appends to calls the call of each result (zero for a call the
// node gave up on), and forgets the calls whose END this is.
func (t *callTable) route(results []*workerpb.Result, calls []pendingCall) []pendingCall {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, r := range results {
		pc := t.pending[r.Id]
		calls = append(calls, pc)
		if r.Kind == workerpb.Result_END && (pc.ch != nil || pc.async != nil) {
			delete(t.pending, r.Id)
			if pc.inline {
				t.inlineBusy.Add(-1)
			}
		}
	}
	return calls
}

// breakWith marks the stream broken by err and drops the pending calls:
// they learn of it from the worker's lost, the async ones from markLost,
// which gets them from breakWith.
func (t *callTable) breakWith(err error) map[uint64]pendingCall {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.broken = err
	dropped := t.pending
	t.pending = nil
	return dropped
}

// cause is what broke the stream, or nil.
func (t *callTable) cause() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.broken
}

// spawnWorker starts a worker process and returns once it serves, or fails.
func (p *Pool) spawnWorker(ctx context.Context, name string) (*worker, error) {
	secret, err := newSecret()
	if err != nil {
		return nil, err
	}
	w := p.newWorker(name)
	sock := filepath.Join(p.cfg.SocketDir, w.start+".sock")
	_ = os.Remove(sock)
	rec := lifecycle.Record{Node: p.cfg.Node, Run: p.cfg.Run, Worker: w.start, Pool: p.cfg.Pool, State: lifecycle.StateStarting}
	if err := p.record(rec); err != nil {
		return nil, err
	}
	pipes, err := openWorkerPipes(secret)
	if err != nil {
		p.forget(w.start)
		return nil, err
	}
	hr := newHandshakeReader(name, w.log)
	proc, err := p.startProcess(func() *exec.Cmd { return p.command(name, sock, pipes) }, w.start, hr)
	pipes.closeWorkerEnds()
	if err != nil {
		pipes.lifelineW.Close()
		p.forget(w.start)
		return nil, err
	}
	p.running(w, proc, rec, pipes.lifelineW)

	startCtx, cancel := context.WithTimeout(ctx, p.cfg.StartTimeout)
	defer cancel()
	hs, err := hr.wait(startCtx, proc, p.cfg.StartTimeout)
	if err == nil {
		err = w.dial(startCtx, sock, secret)
	}
	if err != nil {
		// Also when the process exited before its handshake: nothing is
		// left to signal then, and the worker was never shared.
		w.stopProcess(lifecycle.ReasonStop, 0)
		return nil, err
	}
	w.setInline(hs)
	p.setFunctions(hs)
	p.startIO(w)
	p.emit(lifecycle.Event{Kind: lifecycle.KindReady, Worker: name, PID: proc.PID(), PGID: proc.PGID()})
	return w, nil
}

// newSecret is a fresh secret for one start of a worker (see secretCreds).
func newSecret() (string, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("worker secret: %w", err)
	}
	return hex.EncodeToString(b), nil
}

// newWorker is the worker for one start of slot name, not yet running.
// Recycling runs two starts of one worker name at once: each start has its
// own socket and registry record.
func (p *Pool) newWorker(name string) *worker {
	w := &worker{
		name:        name,
		start:       name + "-" + strconv.FormatUint(p.spawnSeq.Add(1), 10),
		log:         p.log.With(zap.String("worker", name)),
		maxRequests: uint64(jitter(p.cfg.MaxRequests)),
		calls:       callTable{pending: make(map[uint64]pendingCall)},
		lost:        make(chan struct{}),
		retire:      make(chan struct{}),
		recycle:     make(chan string, 1),
	}
	w.leave = func(markBroken func()) { p.leaveServing(w, markBroken) }
	w.out.lost = func(err error) { w.markLost(fmt.Errorf("worker %s: send: %w", w.name, err)) }
	return w
}

// workerPipes are the pipes a worker starts with besides its output.
//
// The secret goes on a pipe of its own, whole, with the write end closed
// before the fork: the worker reads it to EOF at start and closes its end,
// so no child of the worker can read it (64 bytes fit a pipe's buffer, so
// the write cannot block).
//
// The lifeline's read end goes to the worker; the node keeps the write end
// open for the worker's life and never writes: the worker sees EOF only
// when the node is gone, however it died.
type workerPipes struct {
	secretR, lifelineR, lifelineW *os.File
}

func openWorkerPipes(secret string) (*workerPipes, error) {
	secretR, secretW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("secret pipe: %w", err)
	}
	_, err = secretW.WriteString(secret)
	if cerr := secretW.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		secretR.Close()
		return nil, fmt.Errorf("secret pipe: %w", err)
	}
	lifelineR, lifelineW, err := os.Pipe()
	if err != nil {
		secretR.Close()
		return nil, fmt.Errorf("lifeline pipe: %w", err)
	}
	return &workerPipes{secretR: secretR, lifelineR: lifelineR, lifelineW: lifelineW}, nil
}

// closeWorkerEnds closes the node's copies of the worker's ends, once the
// worker has its own (or failed to start).
func (wp *workerPipes) closeWorkerEnds() {
	wp.lifelineR.Close()
	wp.secretR.Close()
}

// command is the worker's command line, environment and extra files.
func (p *Pool) command(name, sock string, pipes *workerPipes) *exec.Cmd {
	cmd := exec.Command(p.cfg.Python, "-m", "pyfleet.worker",
		"--app", p.cfg.App,
		"--app-dir", p.cfg.AppDir,
		"--socket", sock,
		"--worker-id", name,
		"--concurrency", strconv.Itoa(p.cfg.Concurrency))
	// Not the node's NATS credentials nor any other setting (workerEnv).
	cmd.Env = append(workerEnv(os.Environ()),
		envLifeline+"=3",
		envSecretFD+"=4",
	)
	cmd.Dir = p.cfg.AppDir
	// ExtraFiles start at fd 3.
	cmd.ExtraFiles = []*os.File{pipes.lifelineR, pipes.secretR}
	return cmd
}

// startProcess forks the worker through lifecycle, marked with its start
// and contained as the pool's config says: from the template when one
// serves (Config.Preload), else, or if that fails, by a plain start.
func (p *Pool) startProcess(command func() *exec.Cmd, start string, hr *handshakeReader) (*lifecycle.Process, error) {
	opts := lifecycle.StartOptions{
		Stdout:   hr.stdout,
		Stderr:   hr.stderr,
		Marker:   lifecycle.Marker{Node: p.cfg.Node, Run: p.cfg.Run, Worker: start},
		Events:   p.cfg.Events,
		Contain:  p.cfg.Containment,
		Limits:   p.cfg.limits(),
		Guardian: p.cfg.Guardian,
	}
	if t := p.template(); t != nil {
		proc, err := t.Fork(command(), opts)
		if err == nil {
			return proc, nil
		}
		p.log.Warn("preloaded start failed; starting plainly", zap.String("start", start), zap.Error(err))
	}
	proc, err := lifecycle.Start(p.cfg.Spawner, command(), opts)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", p.cfg.Python, err)
	}
	return proc, nil
}

// running records that w's process runs and says so (spawned), and starts
// the goroutine that holds the lifeline's write end open exactly as long as
// the process may run; closing it once the process is gone keeps fds
// bounded.
func (p *Pool) running(w *worker, proc *lifecycle.Process, rec lifecycle.Record, lifelineW *os.File) {
	w.proc = proc
	w.started = time.Now()
	rec.SetProcess(proc)
	rec.State = lifecycle.StateRunning
	if err := p.record(rec); err != nil {
		p.log.Warn("registry", zap.Error(err))
	}
	p.emit(lifecycle.Event{Kind: lifecycle.KindSpawned, Worker: w.name, PID: proc.PID(), PGID: proc.PGID()})
	p.goroutines.Add(1)
	go func() {
		defer p.goroutines.Done()
		<-proc.Done()
		lifelineW.Close()
		p.forget(w.start)
	}()
}

// dial connects to the worker's socket, opens its stream and waits for the
// worker's first message on it, an empty batch: that message shows the
// connection up, the secret accepted and the stream served, and costs a
// freshly forked worker less than a health check RPC would
// (test/bench/notes.md). On an error nothing of it is left open.
func (w *worker) dial(ctx context.Context, sock, secret string) error {
	conn, err := grpc.NewClient("unix:"+sock, workerDialOptions(secret)...)
	if err != nil {
		return fmt.Errorf("worker %s: dial: %w", w.name, err)
	}
	// The stream lives as long as the worker, not as long as this start.
	stream, err := workerpb.NewWorkerClient(conn).Batches(context.Background())
	if err != nil {
		conn.Close()
		return fmt.Errorf("worker %s: open stream: %w", w.name, err)
	}
	if err := awaitGreeting(ctx, conn, stream); err != nil {
		conn.Close()
		return fmt.Errorf("worker %s: stream: %w", w.name, err)
	}
	w.conn = conn
	w.stream = &batchStream{Worker_BatchesClient: stream}
	w.out.stream = w.stream
	return nil
}

// awaitGreeting reads the worker's first message on stream, which must be
// an empty batch, giving up when ctx ends: Recv takes no context, so conn
// is closed then, which ends it.
func awaitGreeting(ctx context.Context, conn *grpc.ClientConn, stream workerpb.Worker_BatchesClient) error {
	closed := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		conn.Close()
		close(closed)
	})
	first, err := stream.Recv()
	if !stop() {
		<-closed
		return fmt.Errorf("no first message: %w", context.Cause(ctx))
	}
	switch {
	case err != nil:
		return fmt.Errorf("no first message: %w", err)
	case len(first.Results) > 0:
		return fmt.Errorf("first message has %d results, want none", len(first.Results))
	}
	return nil
}

func (w *worker) setInline(hs *handshake) {
	for _, f := range hs.Functions {
		if f.Inline {
			if w.inline == nil {
				w.inline = map[string]bool{}
			}
			w.inline[f.Name] = true
		}
	}
}

// startIO starts w's stream receiver and its exit watcher, which fails its
// calls as soon as the process is gone.
func (p *Pool) startIO(w *worker) {
	p.goroutines.Add(2)
	go func() {
		defer p.goroutines.Done()
		w.recv()
	}()
	go func() {
		defer p.goroutines.Done()
		select {
		case <-w.proc.Done():
			w.markLost(fmt.Errorf("worker %s exited (%s)", w.name, w.proc.Exit()))
		case <-w.lost:
		}
	}()
}

// recv routes results to the calls waiting for them until the stream ends.
func (w *worker) recv() {
	var calls []pendingCall
	for {
		b, err := w.stream.Recv()
		if err != nil {
			w.markLost(fmt.Errorf("worker %s: stream closed: %w", w.name, err))
			return
		}
		// The worker is between two messages: what waits for it goes now.
		w.out.answered()
		calls = w.calls.route(b.Results, calls[:0])
		for i, r := range b.Results {
			if r.Kind == workerpb.Result_LOG {
				// Logged here, not by the call's goroutine: a record may
				// come after its call ended (a thread the call left
				// behind), and it still belongs in the node's log.
				w.logRecord(r)
				continue
			}
			if a := calls[i].async; a != nil {
				// Ended here: its answer goes out from this goroutine,
				// with no hand-off to another.
				a.result(r)
				continue
			}
			ch := calls[i].ch
			if ch == nil {
				continue // a call the node already gave up on
			}
			// Each call's channel is buffered for its END frame, and the
			// one goroutine that runs the call always drains it to END, so
			// this send blocks only while a streaming caller is still
			// consuming chunks.
			select {
			case ch <- r:
			case <-w.lost:
				return
			}
		}
	}
}

// logRecord writes one ctx.log record of the worker's to the node's log, at
// the zap level nearest its Python level, whole: a traceback stays one
// record, unlike what the worker prints, which is logged line by line.
func (w *worker) logRecord(r *workerpb.Result) {
	level := zapcore.InfoLevel
	switch r.Level {
	case "DEBUG", "NOTSET":
		level = zapcore.DebugLevel
	case "WARNING":
		level = zapcore.WarnLevel
	case "ERROR", "CRITICAL":
		level = zapcore.ErrorLevel
	}
	if ce := w.log.Check(level, string(r.Payload)); ce != nil {
		ce.Write(zap.String("request_id", r.RequestId), zap.String("python_level", r.Level), zap.String("stream", "ctx.log"))
	}
}

// markLost fails every pending call and stops new ones from starting. The
// worker leaves the pool's serving set first: from the moment its channel
// breaks it is counted nowhere (Idle, Stats, sessions), whether or not its
// process still runs; its supervisor decides what the loss means (see
// Pool.settleLost).
func (w *worker) markLost(err error) {
	w.lostOnce.Do(func() {
		var dropped map[uint64]pendingCall
		markBroken := func() { dropped = w.calls.breakWith(err) }
		if w.leave != nil {
			w.leave(markBroken)
		} else {
			markBroken()
		}
		close(w.lost)
		for _, pc := range dropped {
			if pc.async != nil {
				pc.async.lost()
			}
		}
	})
}

// isBroken reports whether markLost has run (or is running).
func (w *worker) isBroken() bool {
	return w.calls.cause() != nil
}

// lostCause is what broke the worker's channel, or nil.
func (w *worker) lostCause() error {
	return w.calls.cause()
}

// begin registers a call and sends its frame.
func (w *worker) begin(c *workerpb.Call) (<-chan *workerpb.Result, error) {
	ch := make(chan *workerpb.Result, 1)
	if err := w.calls.add(c.Id, pendingCall{ch: ch, inline: w.inline[c.Function]}); err != nil {
		return nil, err
	}
	if err := w.out.push(c); err != nil {
		return nil, err
	}
	return ch, nil
}

// beginAsync registers a call that recv ends itself, and sends its frame.
// An error means the call was not registered: the stream is broken. Once
// it is, a failed send fails it through markLost.
func (w *worker) beginAsync(c *workerpb.Call, a *asyncCall) error {
	if err := w.calls.add(c.Id, pendingCall{async: a, inline: w.inline[c.Function]}); err != nil {
		return err
	}
	_ = w.out.push(c)
	return nil
}

// cancel asks the worker to stop call id; best effort.
func (w *worker) cancel(id uint64) {
	_ = w.out.push(&workerpb.Call{Id: id, Cancel: true})
}

// record writes rec to the registry, if the pool has one.
func (p *Pool) record(rec lifecycle.Record) error {
	if p.cfg.Registry == nil {
		return nil
	}
	if err := p.cfg.Registry.Put(rec); err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	return nil
}

// forget deletes a start's record once its process and everything marked
// with it are gone.
func (p *Pool) forget(start string) {
	if p.cfg.Registry == nil {
		return
	}
	if err := p.cfg.Registry.Delete(p.cfg.Node, p.cfg.Run, start); err != nil {
		p.log.Warn("registry", zap.Error(err))
	}
}

// stopProcess stops the worker on purpose; the first reason given wins.
func (w *worker) stopProcess(reason string, grace time.Duration) {
	w.why.CompareAndSwap(nil, &reason)
	w.retireOnce.Do(func() { close(w.retire) })
	if w.stream != nil {
		w.stream.closeSend()
	}
	w.proc.Stop(grace)
	if w.conn != nil {
		w.conn.Close()
	}
	w.markLost(fmt.Errorf("worker %s stopped (%s)", w.name, reason))
}

// stoppedFor is why the pool stopped this worker, or "" if it died by itself.
func (w *worker) stoppedFor() string {
	if r := w.why.Load(); r != nil {
		return *r
	}
	return ""
}

// workerDialOptions are how the node dials a worker.
func workerDialOptions(secret string) []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithPerRPCCredentials(secretCreds(secret)),
		// Fixed flow-control windows: otherwise gRPC estimates the
		// bandwidth-delay product by pinging the worker after the data it
		// gets, frames that Python's gRPC pays for about as much as a
		// message. A Unix socket needs no estimate.
		grpc.WithInitialWindowSize(4 << 20),
		grpc.WithInitialConnWindowSize(16 << 20),
		// Connections share write buffers while idle: with many workers
		// those buffers are much of the node's memory.
		grpc.WithSharedWriteBuffer(true),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMessageBytes)),
	}
}

// secretCreds puts the worker's secret on every RPC. The socket is already
// private to the node's user; the secret stops any other process of that
// user from driving a worker it happens to find.
type secretCreds string

func (s secretCreds) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"pyfleet-secret": string(s)}, nil
}

func (secretCreds) RequireTransportSecurity() bool { return false }

// lostError is what a caller gets when its worker died, or its channel to
// the worker broke, under its call. The cause tells a result too large for
// the channel from a crash.
func lostError(w *worker) *call.Error {
	msg := fmt.Sprintf("worker %s was lost while running the call", w.name)
	if err := w.lostCause(); err != nil {
		msg += ": " + err.Error()
	}
	return &call.Error{Code: call.CodeFailed, Type: call.TypeWorkerLost, Message: msg, Worker: w.name}
}
