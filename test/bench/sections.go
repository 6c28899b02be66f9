package main

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/grpc"
)

const (
	echoSubject = "pyfleet.req.default.echo"
	jobSubject  = "pyfleet.job.default.echo"
	// Calls a node's worker may run at once in the throughput runs: enough
	// that the node never holds back what the requesters send (64 in
	// flight over 2 workers), and the ceiling's workers get the same.
	rrConcurrency = 32
)

// payload is the 100-byte JSON body of every echo.
var payload = []byte(`{"message":"` + strings.Repeat("x", 100-len(`{"message":"","n":1}`)) + `","n":1}`)

type variant struct {
	name  string
	call  caller
	watch map[string][]int
}

// compare runs each variant once per round, in turn (A B C A B C ...),
// after one short warm-up run of each.
func (h *harness) compare(ctx context.Context, group string, conc int, vs []variant, prof func(ctx context.Context)) error {
	for _, v := range vs {
		if st := load(ctx, conc, time.Second, v.call, v.watch); st.n == 0 {
			return fmt.Errorf("%s %s: warm-up made no successful call: %v", group, v.name, st.firstErr)
		}
	}
	for r := range h.rounds {
		for _, v := range vs {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			st := load(ctx, conc, h.duration, v.call, v.watch)
			h.res.add(group+"/"+v.name, st)
			h.logf("%s %-8s round %d: %8.0f req/s  p50 %6.0f µs  p99 %6.0f µs  errors %d%s", group, v.name, r+1,
				st.rps(), us(st.p50), us(st.p99), st.errs, errText(st.firstErr))
			if st.errs > 0 && st.n == 0 {
				return fmt.Errorf("%s %s: every call failed: %v", group, v.name, st.firstErr)
			}
		}
	}
	if prof != nil && h.profile != "" {
		prof(ctx)
	}
	return nil
}

func errText(err error) string {
	if err == nil {
		return ""
	}
	return " (" + err.Error() + ")"
}

func us(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }

// profileRun makes one more pyfleet run, not counted, while taking a CPU
// profile of the node (and py-spy profiles of its workers).
func (h *harness) profileRun(ctx context.Context, n *node, group string, conc int, v variant) {
	secs := int(h.duration.Seconds())
	var wg sync.WaitGroup
	if n.metrics != "" {
		wg.Go(func() {
			file := filepath.Join(h.profile, group+"-poolnode.pprof")
			if err := n.fetch(ctx, fmt.Sprintf("/debug/pprof/profile?seconds=%d", secs), file); err != nil {
				h.logf("profile: %v", err)
			} else {
				h.logf("profile: %s", file)
			}
		})
	}
	if h.pyspy != "" {
		for i, pid := range n.workers() {
			wg.Go(func() {
				file := filepath.Join(h.profile, fmt.Sprintf("%s-worker%d.txt", group, i+1))
				cmd := exec.CommandContext(ctx, h.pyspy, "record", "--native", "-r", "250", "-f", "raw", "-d", fmt.Sprint(secs), "-p", fmt.Sprint(pid), "-o", file)
				if out, err := cmd.CombinedOutput(); err != nil {
					h.logf("py-spy: %v: %s", err, out)
				} else {
					h.logf("profile: %s", file)
				}
			})
		}
	}
	time.Sleep(200 * time.Millisecond)
	st := load(ctx, conc, h.duration, v.call, v.watch)
	h.logf("%s %s profiled run: %.0f req/s", group, v.name, st.rps())
	wg.Wait()
}

// requestReply is figure 1: echo throughput at 16 and 64 in flight, pyfleet
// through NATS and poolnode against the same Python workers called directly
// and through the bare relay (relay.go), the floor of anything in front of
// them on NATS.
func (h *harness) requestReply(ctx context.Context) error {
	h.logf("request/reply: starting a node (2 workers, --concurrency %d) and 2 ceiling workers", rrConcurrency)
	n, err := h.startNode(ctx, "rr", nodeOpts{workers: 2, concurrency: rrConcurrency, metrics: h.profile != "", wait: true})
	if err != nil {
		return err
	}
	defer n.close()
	var ws []*pyWorker
	defer func() {
		for _, w := range ws {
			w.close()
		}
	}()
	for i := range 2 {
		w, err := h.startWorker(ctx, fmt.Sprintf("rr%d", i+1), rrConcurrency)
		if err != nil {
			return err
		}
		ws = append(ws, w)
	}
	conns, pids := conns(ws)
	streams, closeStreams, err := openStreams(ctx, conns)
	if err != nil {
		return err
	}
	defer closeStreams()
	rl, err := h.startRelay(ctx, ws)
	if err != nil {
		return err
	}
	defer rl.close()
	nodeWatch := map[string][]int{"poolnode": {n.p.pid()}, "workers": n.workers()}
	ceilWatch := map[string][]int{"workers": pids}
	relayWatch := map[string][]int{"relay": {rl.p.pid()}, "workers": pids}
	for _, fn := range []string{"echo", "echo_async"} {
		for _, conc := range []int{16, 64} {
			group := rrGroup(fn, conc)
			pf := variant{"pyfleet", natsCaller(n.nc, "pyfleet.req.default."+fn, payload), nodeWatch}
			err := h.compare(ctx, group, conc, []variant{
				pf,
				{"relay", natsCaller(rl.nc, relaySubject+"."+fn, payload), relayWatch},
				{"unary", unaryCaller(conns, fn, payload), ceilWatch},
				{"stream", streamCaller(streams, conc, fn, payload), ceilWatch},
			}, func(ctx context.Context) { h.profileRun(ctx, n, group, conc, pf) })
			if err != nil {
				return err
			}
		}
	}
	return nil
}

// rrGroup names the results of one request/reply comparison.
func rrGroup(fn string, conc int) string {
	if fn == "echo" {
		return fmt.Sprintf("rr%d", conc)
	}
	return fmt.Sprintf("rr%d-async", conc)
}

func conns(ws []*pyWorker) ([]*grpc.ClientConn, []int) {
	var cs []*grpc.ClientConn
	var pids []int
	for _, w := range ws {
		cs = append(cs, w.conn)
		pids = append(pids, w.p.pid())
	}
	return cs, pids
}

func openStreams(ctx context.Context, conns []*grpc.ClientConn) ([]*streamClient, func(), error) {
	sctx, cancel := context.WithCancel(ctx)
	var out []*streamClient
	for _, c := range conns {
		s, err := openStream(sctx, c)
		if err != nil {
			cancel()
			return nil, nil, err
		}
		out = append(out, s)
	}
	return out, func() {
		for _, s := range out {
			s.close()
		}
		cancel()
	}, nil
}

// oneAtATime is figure 2: one request at a time, with the node's default
// --concurrency 1 and a ceiling worker started the same way.
func (h *harness) oneAtATime(ctx context.Context) error {
	h.logf("one at a time: starting a node (2 workers, --concurrency 1) and a ceiling worker")
	n, err := h.startNode(ctx, "c1", nodeOpts{workers: 2, concurrency: 1, metrics: h.profile != "", wait: true})
	if err != nil {
		return err
	}
	defer n.close()
	w, err := h.startWorker(ctx, "c1", 1)
	if err != nil {
		return err
	}
	defer w.close()
	cs, pids := conns([]*pyWorker{w})
	streams, closeStreams, err := openStreams(ctx, cs)
	if err != nil {
		return err
	}
	defer closeStreams()
	pf := variant{"pyfleet", natsCaller(n.nc, echoSubject, payload), map[string][]int{"poolnode": {n.p.pid()}, "workers": n.workers()}}
	ceilWatch := map[string][]int{"workers": pids}
	return h.compare(ctx, "c1", 1, []variant{
		pf,
		{"unary", unaryCaller(cs, "echo", payload), ceilWatch},
		{"stream", streamCaller(streams, 1, "echo", payload), ceilWatch},
	}, func(ctx context.Context) { h.profileRun(ctx, n, "c1", 1, pf) })
}

// jobsRun is figure 3: jobs through JetStream (file store), one node, each
// result stored in PYFLEET_RESULTS before the job is acked.
func (h *harness) jobsRun(ctx context.Context) error {
	h.logf("jobs: starting a node (2 workers, --concurrency %d)", rrConcurrency)
	n, err := h.startNode(ctx, "jobs", nodeOpts{workers: 2, concurrency: rrConcurrency, wait: true})
	if err != nil {
		return err
	}
	defer n.close()
	js, err := jetstream.New(n.nc, jetstream.WithPublishAsyncMaxPending(16384))
	if err != nil {
		return err
	}
	// The node creates the streams once it serves requests.
	for end := time.Now().Add(30 * time.Second); ; {
		_, err := js.Stream(ctx, "PYFLEET_RESULTS")
		if err == nil {
			break
		}
		if time.Now().After(end) || ctx.Err() != nil {
			return fmt.Errorf("the node made no PYFLEET_RESULTS stream: %w", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	watch := map[string][]int{"poolnode": {n.p.pid()}, "workers": n.workers()}
	if _, err := h.jobBatch(ctx, js, 500, "warm", watch); err != nil {
		return fmt.Errorf("jobs warm-up: %w", err)
	}
	for r := range h.rounds {
		st, err := h.jobBatch(ctx, js, h.jobs, fmt.Sprintf("r%d", r), watch)
		if err != nil {
			return err
		}
		h.res.add("jobs/pyfleet", st)
		h.logf("jobs round %d: %d jobs in %.2f s = %.0f jobs/s", r+1, st.n, st.elapsed.Seconds(), st.rps())
	}
	return nil
}

// jobBatch publishes n jobs and waits until all n results are stored.
func (h *harness) jobBatch(ctx context.Context, js jetstream.JetStream, n int, tag string, watch map[string][]int) (runStats, error) {
	results, err := js.Stream(ctx, "PYFLEET_RESULTS")
	if err != nil {
		return runStats{}, err
	}
	info, err := results.Info(ctx)
	if err != nil {
		return runStats{}, err
	}
	before := info.State.Msgs
	cpu0 := cpuOf(watch)
	start := time.Now()
	var lastID string
	for i := range n {
		lastID = fmt.Sprintf("%s-%s-%d", h.id, tag, i)
		m := &nats.Msg{Subject: jobSubject, Header: nats.Header{}, Data: payload}
		m.Header.Set(nats.MsgIdHdr, lastID)
		if _, err := js.PublishMsgAsync(m); err != nil {
			return runStats{}, fmt.Errorf("publish job: %w", err)
		}
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-time.After(60 * time.Second):
		return runStats{}, errors.New("jobs not all acknowledged by JetStream in 60 s")
	case <-ctx.Done():
		return runStats{}, ctx.Err()
	}
	deadline := time.Now().Add(120 * time.Second)
	for {
		info, err := results.Info(ctx)
		if err != nil {
			return runStats{}, err
		}
		if info.State.Msgs >= before+uint64(n) {
			break
		}
		if time.Now().After(deadline) {
			return runStats{}, fmt.Errorf("only %d of %d results stored in 120 s", info.State.Msgs-before, n)
		}
		select {
		case <-time.After(5 * time.Millisecond):
		case <-ctx.Done():
			return runStats{}, ctx.Err()
		}
	}
	st := runStats{n: n, elapsed: time.Since(start), cpu: map[string]time.Duration{}}
	for k, v := range cpuOf(watch) {
		st.cpu[k] = v - cpu0[k]
	}
	last, err := results.GetLastMsgForSubject(ctx, "pyfleet.result.default."+lastID)
	if err != nil {
		return st, fmt.Errorf("result of the last job: %w", err)
	}
	if s := last.Header.Get("Pyfleet-Status"); s != "ok" {
		return st, fmt.Errorf("the last job's result is %q: %s", s, last.Data)
	}
	return st, nil
}

// startKillMemory is figures 4 to 6 with a NATS server of the harness's own,
// so that killing a node does not take NATS away: time until N workers are
// ready against N bare interpreter starts, poolnode's RSS with h.big workers,
// and the time from its SIGKILL until the last of its processes is gone.
func (h *harness) startKillMemory(ctx context.Context) error {
	url, nc, stop, err := h.harnessNATS("nats")
	if err != nil {
		return err
	}
	defer stop()
	for r := range h.rounds {
		for _, size := range []int{8, h.big} {
			d, err := h.bare(ctx, size)
			if err != nil {
				return err
			}
			h.res.addValue(fmt.Sprintf("start%d/bare", size), d.Seconds())
			h.logf("start %d round %d: bare `import grpc` x%d: %.2f s", size, r+1, size, d.Seconds())
			if err := h.nodeLife(ctx, nc, url, size, r); err != nil {
				return err
			}
		}
	}
	return nil
}

// harnessNATS starts a NATS server inside the harness, for nodes started
// with --nats: killing a node then does not take NATS away. stop shuts it
// down.
func (h *harness) harnessNATS(dir string) (url string, nc *nats.Conn, stop func(), err error) {
	ns, err := server.NewServer(&server.Options{
		Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: filepath.Join(h.tmp, dir),
		NoSigs: true, NoLog: true, MaxPayload: 8 << 20,
	})
	if err != nil {
		return "", nil, nil, err
	}
	ns.Start()
	shutdown := func() {
		ns.Shutdown()
		ns.WaitForShutdown()
	}
	if !ns.ReadyForConnections(10 * time.Second) {
		shutdown()
		return "", nil, nil, errors.New("harness NATS server not ready")
	}
	if nc, err = nats.Connect(ns.ClientURL(), nats.Name("bench")); err != nil {
		shutdown()
		return "", nil, nil, err
	}
	return ns.ClientURL(), nc, func() {
		nc.Close()
		shutdown()
	}, nil
}

// bare runs n `python -c 'import grpc'`, as many at a time as there are cores.
func (h *harness) bare(ctx context.Context, n int) (time.Duration, error) {
	var next atomic.Int64
	var firstErr atomic.Pointer[error]
	var wg sync.WaitGroup
	var ru0 syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_CHILDREN, &ru0)
	start := time.Now()
	defer func() {
		var ru syscall.Rusage
		_ = syscall.Getrusage(syscall.RUSAGE_CHILDREN, &ru)
		cpu := time.Duration(ru.Utime.Nano()+ru.Stime.Nano()-ru0.Utime.Nano()-ru0.Stime.Nano()) * time.Nanosecond
		h.logf("bare x%d: CPU %.2f s", n, cpu.Seconds())
	}()
	for range runtime.NumCPU() {
		wg.Go(func() {
			for next.Add(1) <= int64(n) && ctx.Err() == nil {
				cmd := exec.CommandContext(ctx, h.python, "-c", "import grpc")
				cmd.Dir = h.root
				cmd.Env = childEnv()
				cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
				if out, err := cmd.CombinedOutput(); err != nil {
					err = fmt.Errorf("python -c 'import grpc': %w: %s", err, out)
					firstErr.CompareAndSwap(nil, &err)
				}
			}
		})
	}
	wg.Wait()
	if p := firstErr.Load(); p != nil {
		return 0, *p
	}
	return time.Since(start), ctx.Err()
}

// nodeLife starts a node with size workers, times their start, measures
// its RSS after a little load, kills it with SIGKILL and times until the
// last of its processes is gone.
func (h *harness) nodeLife(ctx context.Context, nc *nats.Conn, url string, size, round int) error {
	short := fmt.Sprintf("life%d-%d", size, round)
	name := h.id + "-" + short
	ready := make(chan *nats.Msg, size*2)
	sub, err := nc.ChanSubscribe("pyfleet.evt.default."+name+".ready", ready)
	if err != nil {
		return err
	}
	defer sub.Unsubscribe()
	if err := nc.Flush(); err != nil {
		return err
	}
	start := time.Now()
	n, err := h.startNode(ctx, short, nodeOpts{workers: size, concurrency: 1, natsURL: url})
	if err != nil {
		return err
	}
	defer n.close()
	got := 0
	timeout := time.After(4 * time.Minute)
	for got < size {
		select {
		case <-ready:
			got++
		case <-n.p.done:
			return fmt.Errorf("node with %d workers exited before they were ready:\n%s", size, n.p.tail())
		case <-timeout:
			return fmt.Errorf("only %d of %d workers ready in 4 minutes", got, size)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	took := time.Since(start)
	nodeCPU, _ := cpuTime(n.p.pid())
	var workersCPU time.Duration
	for _, pid := range n.workers() {
		d, _ := cpuTime(pid)
		workersCPU += d
	}
	h.res.addValue(fmt.Sprintf("start%d/pyfleet", size), took.Seconds())
	h.logf("start %d round %d: node ready with %d workers in %.2f s (CPU: poolnode %.2f s, workers %.2f s)",
		size, round+1, size, took.Seconds(), nodeCPU.Seconds(), workersCPU.Seconds())

	if err := n.waitServing(ctx, time.Minute); err != nil {
		return fmt.Errorf("node with %d workers: %w", size, err)
	}
	if h.autoMode == "" {
		if h.autoMode, err = serviceMode(nc, name); err != nil {
			return err
		}
	}
	idle, _ := rssKB(n.p.pid())
	// A little load through every worker, so that their streams and
	// buffers are in use, before the memory is read.
	st := load(ctx, 64, time.Second, natsCaller(n.nc, echoSubject, payload), nil)
	if st.n == 0 {
		return fmt.Errorf("node with %d workers answered no call: %v", size, st.firstErr)
	}
	loaded, err := rssKB(n.p.pid())
	if err != nil {
		return err
	}
	h.res.addValue(fmt.Sprintf("rss%d/idle", size), float64(idle)/1024)
	h.res.addValue(fmt.Sprintf("rss%d/loaded", size), float64(loaded)/1024)
	h.logf("rss %d round %d: poolnode VmRSS %.1f MB idle, %.1f MB after load", size, round+1, float64(idle)/1024, float64(loaded)/1024)

	if marked := markedPIDs(name + "/"); len(marked) < size {
		return fmt.Errorf("found %d marked processes of a node with %d workers", len(marked), size)
	}
	t0 := time.Now()
	_ = syscall.Kill(n.p.pid(), syscall.SIGKILL)
	for {
		if n.p.exited() && len(markedPIDs(name+"/")) == 0 {
			break
		}
		if time.Since(t0) > 30*time.Second {
			return fmt.Errorf("processes of the killed node still alive after 30 s: %v", markedPIDs(name+"/"))
		}
		time.Sleep(2 * time.Millisecond)
	}
	gone := time.Since(t0)
	h.res.addValue(fmt.Sprintf("kill%d/pyfleet", size), gone.Seconds())
	h.logf("kill %d round %d: all processes gone %.0f ms after SIGKILL", size, round+1, gone.Seconds()*1000)
	return nil
}
