package main

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
	"google.golang.org/grpc"

	"github.com/pyfleet/pyfleet/proto/workerpb"
)

// runStats is one timed run of one load.
type runStats struct {
	n, errs  int
	elapsed  time.Duration
	p50, p99 time.Duration
	firstErr error
	// cpu is CPU time spent during the run, by component.
	cpu map[string]time.Duration
}

func (r runStats) rps() float64 { return float64(r.n) / r.elapsed.Seconds() }

// cpuPerReq is the CPU per successful request of a component, in µs.
func (r runStats) cpuPerReq(component string) float64 {
	if r.n == 0 {
		return 0
	}
	return float64(r.cpu[component].Microseconds()) / float64(r.n)
}

// caller makes one request; worker says which of several targets to use.
type caller func(ctx context.Context, requester int) error

// load runs conc requesters, each making one request at a time, for dur.
// watch names the processes whose CPU time is taken for the run.
func load(ctx context.Context, conc int, dur time.Duration, do caller, watch map[string][]int) runStats {
	before := cpuOf(watch)
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		lats     []time.Duration
		errs     atomic.Int64
		firstErr atomic.Pointer[error]
	)
	start := time.Now()
	end := start.Add(dur)
	for i := range conc {
		wg.Go(func() {
			mine := make([]time.Duration, 0, 1<<16)
			for ctx.Err() == nil {
				t0 := time.Now()
				if !t0.Before(end) {
					break
				}
				err := do(ctx, i)
				if err != nil {
					if ctx.Err() != nil {
						break
					}
					errs.Add(1)
					firstErr.CompareAndSwap(nil, &err)
					continue
				}
				mine = append(mine, time.Since(t0))
			}
			mu.Lock()
			lats = append(lats, mine...)
			mu.Unlock()
		})
	}
	wg.Wait()
	st := runStats{elapsed: time.Since(start), n: len(lats), errs: int(errs.Load())}
	after := cpuOf(watch)
	st.cpu = map[string]time.Duration{}
	for k, v := range after {
		st.cpu[k] = v - before[k]
	}
	if p := firstErr.Load(); p != nil {
		st.firstErr = *p
	}
	slices.Sort(lats)
	st.p50 = percentile(lats, 0.50)
	st.p99 = percentile(lats, 0.99)
	return st
}

// cpuOf sums the CPU time of each group of pids; "harness" is this process.
func cpuOf(watch map[string][]int) map[string]time.Duration {
	out := map[string]time.Duration{}
	for name, pids := range watch {
		for _, pid := range pids {
			if d, err := cpuTime(pid); err == nil {
				out[name] += d
			}
		}
	}
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) == nil {
		out["harness"] = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	return out
}

func percentile(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(q*float64(len(sorted))+0.999999) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// natsCaller requests subj through NATS, as any client of pyfleet does.
func natsCaller(nc *nats.Conn, subj string, payload []byte) caller {
	return func(ctx context.Context, _ int) error {
		m, err := nc.Request(subj, payload, 10*time.Second)
		if err != nil {
			return err
		}
		if code := m.Header.Get(micro.ErrorCodeHeader); code != "" {
			return fmt.Errorf("error %s: %s", code, m.Header.Get(micro.ErrorHeader))
		}
		return nil
	}
}

// unaryCaller calls the workers' unary RPC, requester i on worker i mod n:
// one plain gRPC call per request, the usual way to call a Python service.
func unaryCaller(conns []*grpc.ClientConn, function string, payload []byte) caller {
	clients := make([]workerpb.WorkerClient, len(conns))
	for i, c := range conns {
		clients[i] = workerpb.NewWorkerClient(c)
	}
	var ids atomic.Uint64
	return func(ctx context.Context, i int) error {
		r, err := clients[i%len(clients)].Unary(ctx, &workerpb.Call{Id: ids.Add(1), Function: function, Payload: payload})
		if err != nil {
			return err
		}
		if r.Error != nil {
			return fmt.Errorf("error %d: %s", r.Error.Code, r.Error.Message)
		}
		return nil
	}
}

// streamClient drives one worker's Batches stream directly, the way the
// node does (frames ready together go in one message) with nothing else
// around it: the ceiling for anything that forwards calls over that stream.
type streamClient struct {
	stream  workerpb.Worker_BatchesClient
	mu      sync.Mutex
	pending map[uint64]pendingCall
	ids     atomic.Uint64
	err     atomic.Pointer[error]

	outMu      sync.Mutex
	out        []*workerpb.Call
	sending    bool
	unanswered bool
	held       bool
	hold       *time.Timer
}

func openStream(ctx context.Context, conn *grpc.ClientConn) (*streamClient, error) {
	st, err := workerpb.NewWorkerClient(conn).Batches(ctx)
	if err != nil {
		return nil, err
	}
	s := &streamClient{stream: st, pending: map[uint64]pendingCall{}}
	go s.recv()
	return s, nil
}

func (s *streamClient) recv() {
	for {
		b, err := s.stream.Recv()
		if err != nil {
			s.err.Store(&err)
			s.mu.Lock()
			left := s.pending
			s.pending = map[uint64]pendingCall{}
			s.mu.Unlock()
			for _, c := range left {
				c.end(nil)
			}
			return
		}
		s.answered()
		for _, r := range b.Results {
			s.mu.Lock()
			c, ok := s.pending[r.Id]
			delete(s.pending, r.Id)
			s.mu.Unlock()
			if ok {
				c.end(r)
			}
		}
	}
}

// send sends c as the node sends frames (pool/worker.go): at once while
// the worker has answered the last message, else held until it answers (or
// for 2 ms at most) and sent with whatever else waits.
func (s *streamClient) send(c *workerpb.Call) error {
	s.outMu.Lock()
	s.out = append(s.out, c)
	if s.sending {
		s.outMu.Unlock()
		return nil
	}
	if s.unanswered {
		if !s.held {
			s.held = true
			if s.hold == nil {
				s.hold = time.AfterFunc(2*time.Millisecond, s.holdExpired)
			} else {
				s.hold.Reset(2 * time.Millisecond)
			}
		}
		s.outMu.Unlock()
		return nil
	}
	return s.flush()
}

func (s *streamClient) answered() {
	s.outMu.Lock()
	s.unanswered = false
	if s.sending || len(s.out) == 0 {
		s.outMu.Unlock()
		return
	}
	_ = s.flush()
}

func (s *streamClient) holdExpired() {
	s.outMu.Lock()
	s.held = false
	if s.sending || len(s.out) == 0 {
		s.outMu.Unlock()
		return
	}
	_ = s.flush()
}

// flush is called with outMu held and releases it.
func (s *streamClient) flush() error {
	s.sending = true
	if s.held {
		s.held = false
		s.hold.Stop()
	}
	var err error
	for len(s.out) > 0 && err == nil {
		batch := &workerpb.CallBatch{Calls: s.out}
		s.out = nil
		s.unanswered = true
		s.outMu.Unlock()
		err = s.stream.Send(batch)
		s.outMu.Lock()
	}
	s.sending = false
	s.outMu.Unlock()
	return err
}

// pendingCall is how a call's result is handed on: to the channel of a
// caller waiting in call, or to the function start was given. A nil
// result means the stream ended first.
type pendingCall struct {
	ch   chan *workerpb.Result
	done func(*workerpb.Result)
}

func (c pendingCall) end(r *workerpb.Result) {
	switch {
	case c.done != nil:
		c.done(r)
	case r == nil:
		close(c.ch)
	default:
		c.ch <- r
	}
}

// enqueue registers c and sends its call.
func (s *streamClient) enqueue(c pendingCall, function string, payload []byte) error {
	if p := s.err.Load(); p != nil {
		return *p
	}
	id := s.ids.Add(1)
	s.mu.Lock()
	s.pending[id] = c
	s.mu.Unlock()
	return s.send(&workerpb.Call{Id: id, Function: function, Payload: payload})
}

// start sends a call and returns; done gets its result from the stream's
// receiver (the relay's way, which waits on nothing).
func (s *streamClient) start(function string, payload []byte, done func(*workerpb.Result)) error {
	return s.enqueue(pendingCall{done: done}, function, payload)
}

func (s *streamClient) call(ch chan *workerpb.Result, function string, payload []byte) error {
	if err := s.enqueue(pendingCall{ch: ch}, function, payload); err != nil {
		return err
	}
	r, ok := <-ch
	if !ok {
		return errors.New("stream closed")
	}
	if r.Error != nil {
		return fmt.Errorf("error %d: %s", r.Error.Code, r.Error.Message)
	}
	return nil
}

func (s *streamClient) close() { _ = s.stream.CloseSend() }

// streamCaller spreads requesters over the streams, i on stream i mod n.
func streamCaller(streams []*streamClient, conc int, function string, payload []byte) caller {
	chans := make([]chan *workerpb.Result, conc)
	for i := range chans {
		chans[i] = make(chan *workerpb.Result, 1)
	}
	return func(ctx context.Context, i int) error {
		return streams[i%len(streams)].call(chans[i], function, payload)
	}
}
