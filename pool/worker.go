package pool

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/lifecycle"
	"github.com/pyfleet/pyfleet/proto/workerpb"
)

// The worker's first words on stdout: one of these, then a JSON object.
const (
	handshakeReady = "PYFLEET-READY "
	handshakeError = "PYFLEET-ERROR "
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

// handshake is the JSON a worker prints once it serves.
type handshake struct {
	Version   int `json:"v"`
	PID       int `json:"pid"`
	Functions []struct {
		Name   string `json:"name"`
		Raw    bool   `json:"raw"`
		Stream bool   `json:"stream"`
		// Inline says the worker runs the function on its event loop,
		// which answers nothing else (health checks included) meanwhile.
		Inline bool `json:"inline"`
	} `json:"functions"`
}

// AppError is a worker that could not load the app: restarting cannot help,
// so the node reports it and exits.
type AppError struct {
	Type    string `json:"type"`
	Message string `json:"message"`
}

func (e *AppError) Error() string {
	return fmt.Sprintf("the app failed to load: %s: %s", e.Type, e.Message)
}

// worker is one running Python process and its Batches stream. Its calls
// are matched to results by id; recv owns the stream's receive side.
type worker struct {
	name  string // e.g. "w3", unique in the node
	start string // this start of it, e.g. "w3-17": its socket, registry key and marker
	proc  *lifecycle.Process
	conn  *grpc.ClientConn
	log   *zap.Logger

	stream workerpb.Worker_BatchesClient
	sendMu sync.Mutex // grpc streams allow one sender at a time

	// out holds frames waiting to be sent; sending says a goroutine is in
	// flush's loop and will send them; unanswered says a message went out
	// and no result has come back since; hold flushes held frames when
	// the worker takes too long to answer. See send.
	outMu      sync.Mutex
	out        []*workerpb.Call
	sending    bool
	unanswered bool
	held       bool // hold is armed
	hold       *time.Timer

	mu      sync.Mutex
	pending map[uint64]pendingCall
	broken  error // set once the stream failed; no call can start after

	// inline names the functions the worker runs on its event loop, and
	// inlineBusy counts such calls under way: while there is one, failed
	// health checks say the worker is busy, not hung (see watch).
	inline     map[string]bool
	inlineBusy atomic.Int64

	nextID      atomic.Uint64
	handled     atomic.Uint64
	maxRequests uint64 // with jitter; 0: no limit
	inflight    atomic.Int64
	started     time.Time

	// lost is closed when the stream breaks or the process exits: every
	// pending call fails at once rather than waiting for its deadline.
	lost     chan struct{}
	lostOnce sync.Once
	// leave takes the worker out of the pool's serving set and runs
	// markBroken under the pool's lock, so that serve never registers a
	// broken worker and no caller who learns of the loss (from begin's
	// error or from lost) finds the worker still counted.
	leave func(markBroken func())

	// why is the reason the pool stopped this worker on purpose (stop,
	// deadline, recycle, unhealthy); empty means it died by itself.
	why atomic.Pointer[string]

	// pinned carries calls of sessions bound to this worker.
	pinned chan *job
	// retire is closed when the worker must take no more calls.
	retire     chan struct{}
	retireOnce sync.Once

	// slots counts this worker's slot goroutines still running.
	slots sync.WaitGroup
	// monitor counts its watch goroutine.
	monitor sync.WaitGroup
	// recycle carries the monitor's request to replace the worker (the
	// reason, for the log); buffered so the monitor never waits.
	recycle chan string
}

type spawnResult struct {
	hs  *handshake
	err error
}

// spawnWorker starts a worker process and returns once it serves, or fails.
func (p *Pool) spawnWorker(ctx context.Context, name string) (*worker, error) {
	secretBytes := make([]byte, 32)
	if _, err := rand.Read(secretBytes); err != nil {
		return nil, fmt.Errorf("worker secret: %w", err)
	}
	secret := hex.EncodeToString(secretBytes)
	// Recycling runs two starts of one worker name at once: each start has
	// its own socket and registry record.
	start := name + "-" + strconv.FormatUint(p.spawnSeq.Add(1), 10)
	sock := filepath.Join(p.cfg.SocketDir, start+".sock")
	_ = os.Remove(sock)
	rec := lifecycle.Record{Node: p.cfg.Node, Run: p.cfg.Run, Worker: start, Pool: p.cfg.Pool, State: lifecycle.StateStarting}
	if err := p.record(rec); err != nil {
		return nil, err
	}

	// The secret goes on a pipe of its own, whole, with the write end closed
	// before the fork: the worker reads it to EOF at start and closes its
	// end, so no child of the worker can read it (64 bytes fit a pipe's
	// buffer, so the write cannot block).
	secretR, secretW, err := os.Pipe()
	if err != nil {
		p.forget(start)
		return nil, fmt.Errorf("secret pipe: %w", err)
	}
	_, err = secretW.WriteString(secret)
	if cerr := secretW.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		secretR.Close()
		p.forget(start)
		return nil, fmt.Errorf("secret pipe: %w", err)
	}
	lifelineR, lifelineW, err := os.Pipe()
	if err != nil {
		secretR.Close()
		p.forget(start)
		return nil, fmt.Errorf("lifeline pipe: %w", err)
	}
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
	// The lifeline's read end becomes fd 3 in the worker. The node keeps the
	// write end open for the worker's life and never writes: the worker sees
	// EOF only when the node is gone, however it died. The secret's read end
	// becomes fd 4.
	cmd.ExtraFiles = []*os.File{lifelineR, secretR}

	w := &worker{
		name:    name,
		start:   start,
		log:     p.log.With(zap.String("worker", name)),
		pending: make(map[uint64]pendingCall),
		lost:    make(chan struct{}),
		pinned:  make(chan *job),
		retire:  make(chan struct{}),
		recycle: make(chan string, 1),
	}
	w.leave = func(markBroken func()) { p.leaveServing(w, markBroken) }
	w.maxRequests = uint64(jitter(p.cfg.MaxRequests))
	ready := make(chan spawnResult, 1)
	var stderrTail tail
	onStdout := func(line []byte) {
		if !bytes.HasPrefix(line, []byte(handshakeReady)) && !bytes.HasPrefix(line, []byte(handshakeError)) {
			w.log.Info(string(line), zap.String("stream", "stdout"))
			return
		}
		res := spawnResult{}
		if bytes.HasPrefix(line, []byte(handshakeReady)) {
			var hs handshake
			if err := json.Unmarshal(line[len(handshakeReady):], &hs); err != nil {
				res.err = fmt.Errorf("worker %s: bad handshake %q: %w", name, line, err)
			} else {
				res.hs = &hs
			}
		} else {
			var ae AppError
			if err := json.Unmarshal(line[len(handshakeError):], &ae); err != nil {
				res.err = fmt.Errorf("worker %s: bad error line %q: %w", name, line, err)
			} else {
				res.err = &ae
			}
		}
		select {
		case ready <- res:
		default: // a second handshake line is garbage; the first one counts
			w.log.Warn("unexpected handshake line", zap.ByteString("line", line))
		}
	}
	onStderr := func(line []byte) {
		stderrTail.add(line)
		w.log.Info(string(line), zap.String("stream", "stderr"))
	}

	proc, err := lifecycle.Start(p.cfg.Spawner, cmd, lifecycle.StartOptions{
		Stdout:   onStdout,
		Stderr:   onStderr,
		Marker:   lifecycle.Marker{Node: p.cfg.Node, Run: p.cfg.Run, Worker: start},
		Events:   p.cfg.Events,
		Contain:  p.cfg.Containment,
		Limits:   p.cfg.limits(),
		Guardian: p.cfg.Guardian,
	})
	lifelineR.Close()
	secretR.Close() // the worker has its own copy
	if err != nil {
		lifelineW.Close()
		p.forget(start)
		return nil, fmt.Errorf("start %s: %w", p.cfg.Python, err)
	}
	w.proc = proc
	w.started = time.Now()
	rec.SetProcess(proc)
	rec.State = lifecycle.StateRunning
	if err := p.record(rec); err != nil {
		p.log.Warn("registry", zap.Error(err))
	}
	p.emit(lifecycle.Event{Kind: lifecycle.KindSpawned, Worker: name, PID: proc.PID(), PGID: proc.PGID()})

	// The lifeline's write end must stay open exactly as long as the process
	// may run; closing it once the process is gone keeps fds bounded.
	p.goroutines.Add(1)
	go func() {
		defer p.goroutines.Done()
		<-proc.Done()
		lifelineW.Close()
		p.forget(start)
	}()

	fail := func(err error) (*worker, error) {
		w.stopProcess(lifecycle.ReasonStop, 0)
		return nil, err
	}
	startCtx, cancel := context.WithTimeout(ctx, p.cfg.StartTimeout)
	defer cancel()
	var hs *handshake
	select {
	case res := <-ready:
		if res.err != nil {
			return fail(res.err)
		}
		hs = res.hs
	case <-proc.Done():
		// Done closes only after the output readers have passed on every
		// line, so an error line the worker printed before exiting is here.
		select {
		case res := <-ready:
			if res.err != nil {
				return nil, res.err
			}
		default:
		}
		st := proc.Exit()
		return nil, fmt.Errorf("worker %s exited before its handshake (%s): %s", name, st, stderrTail.String())
	case <-startCtx.Done():
		return fail(fmt.Errorf("worker %s sent no handshake within %s", name, p.cfg.StartTimeout))
	}

	conn, err := grpc.NewClient("unix:"+sock, workerDialOptions(secret)...)
	if err != nil {
		return fail(fmt.Errorf("worker %s: dial: %w", name, err))
	}
	w.conn = conn
	if _, err := healthpb.NewHealthClient(conn).Check(startCtx, &healthpb.HealthCheckRequest{}); err != nil {
		conn.Close()
		return fail(fmt.Errorf("worker %s: health check: %w", name, err))
	}
	// The stream lives as long as the worker, not as long as this start.
	stream, err := workerpb.NewWorkerClient(conn).Batches(context.Background())
	if err != nil {
		conn.Close()
		return fail(fmt.Errorf("worker %s: open stream: %w", name, err))
	}
	w.stream = stream
	for _, f := range hs.Functions {
		if f.Inline {
			if w.inline == nil {
				w.inline = map[string]bool{}
			}
			w.inline[f.Name] = true
		}
	}
	p.setFunctions(hs)

	p.goroutines.Add(2)
	go func() {
		defer p.goroutines.Done()
		w.recv()
	}()
	go func() {
		defer p.goroutines.Done()
		select {
		case <-proc.Done():
			w.markLost(fmt.Errorf("worker %s exited (%s)", name, proc.Exit()))
		case <-w.lost:
		}
	}()
	p.emit(lifecycle.Event{Kind: lifecycle.KindReady, Worker: name, PID: proc.PID(), PGID: proc.PGID()})
	return w, nil
}

// pendingCall is a call sent to the worker whose END has not come back.
type pendingCall struct {
	ch     chan *workerpb.Result
	inline bool // counted in inlineBusy
}

// recv routes results to the calls waiting for them until the stream ends.
func (w *worker) recv() {
	var chans []chan *workerpb.Result
	for {
		b, err := w.stream.Recv()
		if err != nil {
			w.markLost(fmt.Errorf("worker %s: stream closed: %w", w.name, err))
			return
		}
		// The worker is between two messages: what waits for it goes now.
		w.answered()
		chans = chans[:0]
		w.mu.Lock()
		for _, r := range b.Results {
			pc := w.pending[r.Id]
			chans = append(chans, pc.ch)
			if r.Kind == workerpb.Result_END && pc.ch != nil {
				delete(w.pending, r.Id)
				if pc.inline {
					w.inlineBusy.Add(-1)
				}
			}
		}
		w.mu.Unlock()
		for i, r := range b.Results {
			ch := chans[i]
			if ch == nil {
				continue // a call the node already gave up on
			}
			// Each call's channel is buffered for its END frame, and the
			// one slot goroutine that reads it always drains to END, so
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

// markLost fails every pending call and stops new ones from starting. The
// worker leaves the pool's serving set first: from the moment its channel
// breaks it is counted nowhere (Idle, Stats, sessions), whether or not its
// process still runs; its supervisor decides what the loss means (see
// Pool.settleLost).
func (w *worker) markLost(err error) {
	w.lostOnce.Do(func() {
		markBroken := func() {
			w.mu.Lock()
			w.broken = err
			w.pending = nil
			w.mu.Unlock()
		}
		if w.leave != nil {
			w.leave(markBroken)
		} else {
			markBroken()
		}
		close(w.lost)
	})
}

// isBroken reports whether markLost has run (or is running).
func (w *worker) isBroken() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.broken != nil
}

// lostCause is what broke the worker's channel, or nil.
func (w *worker) lostCause() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.broken
}

// begin registers a call and sends its frame.
func (w *worker) begin(c *workerpb.Call) (<-chan *workerpb.Result, error) {
	ch := make(chan *workerpb.Result, 1)
	w.mu.Lock()
	if w.broken != nil {
		err := w.broken
		w.mu.Unlock()
		return nil, err
	}
	inline := w.inline[c.Function]
	if inline {
		w.inlineBusy.Add(1)
	}
	w.pending[c.Id] = pendingCall{ch: ch, inline: inline}
	w.mu.Unlock()
	if err := w.send(c); err != nil {
		return nil, err
	}
	return ch, nil
}

// maxHold bounds how long a frame waits for the worker to answer the last
// message before it is sent anyway (see send).
const maxHold = 2 * time.Millisecond

// batchBytes bounds the payload bytes of one CallBatch (which holds at
// least one frame): batching is for small frames.
const batchBytes = 1 << 20

// maxMessageBytes is the largest message the node takes from a worker: the
// worker's own limit (python/pyfleet/servicer.py), plus room for a batch's
// other frames.
const maxMessageBytes = 65 << 20

// send queues c to be sent and sees that it is. In Python each gRPC message
// costs the worker far more than the frames in it, so frames travel
// together when they can, without making a lone one wait:
//
//   - If the worker has answered (sent results) since the last message went
//     out, or nothing went out yet, the frame goes at once, with any others
//     queued: an idle worker gets each call without delay.
//   - Otherwise the worker is busy with what it got, and could not read the
//     frame before it answers anyway: the frame waits for that answer (recv
//     sends what waits as one message when results come), or for maxHold,
//     whichever is first, in case the worker is busy with long calls.
//   - While a goroutine sends, frames queue up and it sends them next.
//
// A nil error means the frame was sent or will be; if a send fails the
// stream is lost, and every call learns it from w.lost.
func (w *worker) send(c *workerpb.Call) error {
	w.outMu.Lock()
	w.out = append(w.out, c)
	if w.sending {
		w.outMu.Unlock()
		return nil
	}
	if w.unanswered {
		if !w.held {
			w.held = true
			if w.hold == nil {
				w.hold = time.AfterFunc(maxHold, w.holdExpired)
			} else {
				w.hold.Reset(maxHold)
			}
		}
		w.outMu.Unlock()
		return nil
	}
	return w.flush()
}

// answered is called by recv when results came: frames held for them go.
func (w *worker) answered() {
	w.outMu.Lock()
	w.unanswered = false
	if w.sending || len(w.out) == 0 {
		w.outMu.Unlock()
		return
	}
	_ = w.flush()
}

func (w *worker) holdExpired() {
	w.outMu.Lock()
	w.held = false
	if w.sending || len(w.out) == 0 {
		w.outMu.Unlock()
		return
	}
	_ = w.flush()
}

// flush sends the queued frames as one message, and again while more queue
// up meanwhile. It is called with outMu held and releases it.
func (w *worker) flush() error {
	w.sending = true
	if w.held {
		w.held = false
		w.hold.Stop()
	}
	var err error
	for len(w.out) > 0 {
		n, size := 0, 0
		for n < len(w.out) && (n == 0 || size+len(w.out[n].Payload) <= batchBytes) {
			size += len(w.out[n].Payload)
			n++
		}
		// Fresh slices: gRPC may still hold the last message.
		batch := &workerpb.CallBatch{Calls: w.out[:n:n]}
		w.out = append(make([]*workerpb.Call, 0, max(cap(w.out), 1)), w.out[n:]...)
		w.unanswered = true
		w.outMu.Unlock()
		w.sendMu.Lock()
		err = w.stream.Send(batch)
		w.sendMu.Unlock()
		w.outMu.Lock()
		if err != nil {
			w.out = nil
			break
		}
	}
	w.sending = false
	w.outMu.Unlock()
	if err != nil {
		w.markLost(fmt.Errorf("worker %s: send: %w", w.name, err))
	}
	return err
}

// cancel asks the worker to stop call id; best effort.
func (w *worker) cancel(id uint64) {
	_ = w.send(&workerpb.Call{Id: id, Cancel: true})
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
		w.sendMu.Lock()
		_ = w.stream.CloseSend()
		w.sendMu.Unlock()
	}
	w.proc.Stop(grace)
	if w.conn != nil {
		w.conn.Close()
	}
	w.markLost(fmt.Errorf("worker %s stopped (%s)", w.name, reason))
}

// stoppedFor is why the pool stopped the worker, or "" if it died by itself.
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

// tail keeps the last lines of a worker's stderr, to say why it died before
// its handshake.
type tail struct {
	mu    sync.Mutex
	lines []string
}

func (t *tail) add(line []byte) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.lines = append(t.lines, string(line))
	if len(t.lines) > 8 {
		t.lines = t.lines[1:]
	}
}

func (t *tail) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.lines) == 0 {
		return "no output on stderr"
	}
	var b bytes.Buffer
	for i, l := range t.lines {
		if i > 0 {
			b.WriteString(" | ")
		}
		b.WriteString(l)
	}
	return b.String()
}

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
