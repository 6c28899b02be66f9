package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pyfleet/pyfleet/client"
)

type benchCmd struct {
	pool        string
	node        string
	session     string
	n           countFlag
	duration    time.Duration
	concurrency int
	timeout     time.Duration
	json        bool
}

func (c *benchCmd) flags(fs *flag.FlagSet) {
	fs.StringVar(&c.pool, "pool", "default", "`POOL` to load")
	fs.StringVar(&c.node, "node", "", "load this `NODE` only")
	fs.StringVar(&c.session, "session", "", "send every request in this `SESSION`")
	c.n.n = 10000
	fs.Var(&c.n, "n", "number of requests")
	fs.DurationVar(&c.duration, "duration", 0, "run for this long instead of -n requests")
	fs.IntVar(&c.concurrency, "c", 16, "concurrent requests")
	fs.DurationVar(&c.timeout, "timeout", 60*time.Second, "deadline of each request")
	fs.BoolVar(&c.json, "json", false, "print the report as one JSON object")
}

// benchReport is the --json form of the result.
type benchReport struct {
	Requests    int            `json:"requests"`
	OK          int            `json:"ok"`
	Errors      map[string]int `json:"errors"`
	DurationS   float64        `json:"duration_s"`
	RPS         float64        `json:"rps"`
	P50Ms       float64        `json:"p50_ms"`
	P90Ms       float64        `json:"p90_ms"`
	P99Ms       float64        `json:"p99_ms"`
	MaxMs       float64        `json:"max_ms"`
	Concurrency int            `json:"concurrency"`
	Subject     string         `json:"subject"`
}

// caller is one of the -c request loops; it owns its samples and counts so
// the hot loop shares nothing but the request budget.
type caller struct {
	samples []time.Duration
	ok      int
	errs    map[string]int
}

// progress is shared with the progress bar, only when there is one.
type progress struct {
	done atomic.Int64
	errs atomic.Int64
}

func (c *benchCmd) run(ctx context.Context, a *app, args []string) error {
	fn, rest, err := functionArgs(args)
	if err != nil {
		return err
	}
	if err := checkToken("--pool", c.pool); err != nil {
		return err
	}
	if c.node != "" {
		if err := checkToken("--node", c.node); err != nil {
			return err
		}
	}
	switch {
	case c.n.set && c.duration != 0:
		return usagef("use -n or --duration, not both")
	case c.duration < 0:
		return usagef("--duration must be positive")
	case c.duration == 0 && c.n.n <= 0:
		return usagef("-n must be positive")
	case c.concurrency <= 0:
		return usagef("-c must be positive")
	case c.timeout <= 0:
		return usagef("--timeout must be positive")
	}
	body, err := payload(rest, a.stdin, false)
	if err != nil {
		return err
	}
	subj := a.subjects().Request(c.pool, fn) // for the report
	if c.node != "" {
		subj = a.subjects().Node(c.node, c.pool, fn)
	}
	opts := []client.Option{client.WithTimeout(c.timeout)}
	if c.session != "" {
		opts = append(opts, client.WithSession(c.session))
	}
	if c.node != "" {
		opts = append(opts, client.WithNode(c.node))
	}

	// Without heartbeats, as a plain NATS requester: a benchmark measures
	// the fleet, and a heartbeat would add a message to every call.
	fleet, err := a.connect(client.Options{Pool: c.pool, Heartbeat: -1})
	if err != nil {
		return err
	}
	defer fleet.Close()
	if err := probe(ctx, fleet, fn, body, opts); err != nil {
		return err
	}

	var prog *progress
	if a.stderrTTY {
		prog = &progress{}
	}
	var (
		budget  atomic.Int64 // requests handed out, in -n mode
		wg      sync.WaitGroup
		callers = make([]*caller, c.concurrency)
		start   = time.Now()
		end     = start.Add(c.duration)
	)
	for i := range callers {
		cl := &caller{errs: map[string]int{}}
		if c.duration == 0 {
			cl.samples = make([]time.Duration, 0, c.n.n/c.concurrency+1)
		}
		callers[i] = cl
		wg.Go(func() {
			for ctx.Err() == nil {
				if c.duration > 0 {
					if time.Now().After(end) {
						return
					}
				} else if budget.Add(1) > int64(c.n.n) {
					return
				}
				cl.one(ctx, fleet, fn, body, opts, prog)
			}
		})
	}
	stopBar := func() {}
	if prog != nil {
		stopBar = c.startBar(a.stderr, prog, start)
	}
	wg.Wait()
	elapsed := time.Since(start)
	stopBar()

	rep := c.report(callers, elapsed, subj)
	if c.json {
		b, err := json.Marshal(rep)
		if err != nil {
			return err
		}
		_, err = a.stdout.Write(append(b, '\n'))
		return err
	}
	_, err = io.WriteString(a.stdout, rep.text())
	return err
}

// probe makes one uncounted call first, so that a missing node or an unknown
// function is reported as such rather than as 10000 identical errors.
func probe(ctx context.Context, cl *client.Client, fn string, body []byte, opts []client.Option) error {
	err := cl.Call(ctx, fn, body, nil, opts...)
	var ce *client.Error
	if errors.As(err, &ce) && !ce.Local && (ce.Code == 503 || ce.Code == 408) {
		return nil // load, which is what a benchmark measures
	}
	return err
}

func (cl *caller) one(ctx context.Context, c *client.Client, fn string, body []byte, opts []client.Option, prog *progress) {
	t0 := time.Now()
	err := c.Call(ctx, fn, body, nil, opts...)
	lat := time.Since(t0)
	var ce *client.Error
	var code string
	switch {
	case err == nil:
	case ctx.Err() != nil:
		return // interrupted: neither a success nor the system's failure
	case errors.As(err, &ce) && !ce.Local:
		code = strconv.Itoa(ce.Code)
	case errors.As(err, &ce) && ce.Type == client.TypeNoResponders:
		code = "no_responders"
	case errors.Is(err, client.ErrDeadlineExceeded):
		code = "timeout"
	default:
		code = "error"
	}
	cl.samples = append(cl.samples, lat)
	if code == "" {
		cl.ok++
	} else {
		cl.errs[code]++
	}
	if prog != nil {
		prog.done.Add(1)
		if code != "" {
			prog.errs.Add(1)
		}
	}
}

func (c *benchCmd) report(callers []*caller, elapsed time.Duration, subj string) benchReport {
	rep := benchReport{Errors: map[string]int{}, DurationS: elapsed.Seconds(), Concurrency: c.concurrency, Subject: subj}
	var all []time.Duration
	for _, cl := range callers {
		all = append(all, cl.samples...)
		rep.OK += cl.ok
		for k, v := range cl.errs {
			rep.Errors[k] += v
		}
	}
	slices.Sort(all)
	rep.Requests = len(all)
	if elapsed > 0 {
		rep.RPS = float64(rep.Requests) / elapsed.Seconds()
	}
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	rep.P50Ms = ms(percentile(all, 0.50))
	rep.P90Ms = ms(percentile(all, 0.90))
	rep.P99Ms = ms(percentile(all, 0.99))
	if len(all) > 0 {
		rep.MaxMs = ms(all[len(all)-1])
	}
	return rep
}

// percentile is the nearest-rank percentile of sorted samples.
func percentile(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(q*float64(len(sorted))+0.999999) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

func (r benchReport) text() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s: %d requests in %.3fs, %d concurrent\n", r.Subject, r.Requests, r.DurationS, r.Concurrency)
	fmt.Fprintf(&b, "  throughput  %.1f req/s\n", r.RPS)
	fmt.Fprintf(&b, "  latency     p50 %.3fms  p90 %.3fms  p99 %.3fms  max %.3fms\n", r.P50Ms, r.P90Ms, r.P99Ms, r.MaxMs)
	fmt.Fprintf(&b, "  ok          %d\n", r.OK)
	nerr := r.Requests - r.OK
	fmt.Fprintf(&b, "  errors      %d", nerr)
	if nerr > 0 {
		var parts []string
		for _, k := range slices.Sorted(maps.Keys(r.Errors)) {
			parts = append(parts, fmt.Sprintf("%s: %d", k, r.Errors[k]))
		}
		fmt.Fprintf(&b, " (%s)", strings.Join(parts, ", "))
	}
	b.WriteByte('\n')
	return b.String()
}

// startBar redraws a progress line on the terminal ten times a second; the
// returned func stops it, waits for it and clears the line.
func (c *benchCmd) startBar(w io.Writer, prog *progress, start time.Time) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-done:
				io.WriteString(w, "\r\x1b[K")
				return
			case <-t.C:
				io.WriteString(w, c.bar(prog, time.Since(start)))
			}
		}
	})
	return func() {
		close(done)
		wg.Wait()
	}
}

func (c *benchCmd) bar(prog *progress, elapsed time.Duration) string {
	n := prog.done.Load()
	var frac float64
	var count string
	if c.duration > 0 {
		frac = elapsed.Seconds() / c.duration.Seconds()
		count = fmt.Sprintf("%s/%s", elapsed.Truncate(time.Second), c.duration)
	} else {
		frac = float64(n) / float64(c.n.n)
		count = fmt.Sprintf("%d/%d", n, c.n.n)
	}
	frac = min(max(frac, 0), 1)
	const width = 30
	filled := int(frac * width)
	return fmt.Sprintf("\r[%s%s] %3.0f%% %s  %.0f req/s  errors %d\x1b[K",
		strings.Repeat("#", filled), strings.Repeat(".", width-filled), frac*100, count,
		float64(n)/max(elapsed.Seconds(), 1e-9), prog.errs.Load())
}

// countFlag is an int flag that knows whether it was given, so that an
// explicit -n next to --duration is an error and the default is not.
type countFlag struct {
	n   int
	set bool
}

func (f *countFlag) String() string { return strconv.Itoa(f.n) }

func (f *countFlag) Set(s string) error {
	n, err := strconv.Atoi(s)
	if err != nil {
		return errors.New("not a number")
	}
	f.n, f.set = n, true
	return nil
}
