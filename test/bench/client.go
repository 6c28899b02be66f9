package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/pyfleet/pyfleet/client"
)

// clientBench is figures 9 and 10 (issue 12): what the Python client adds
// to a call. One node, and in each round, in turn, the Go client (package
// client, which submit is built on) and python/bench/client_bench.py
// against it: one call at a time, then 64 in flight (AsyncClient in Python,
// 64 goroutines in Go). Both clients ask for heartbeats, as by default.
func (h *harness) clientBench(ctx context.Context) error {
	h.logf("clients: starting a node (2 workers, --concurrency %d)", rrConcurrency)
	n, err := h.startNode(ctx, "cl", nodeOpts{workers: 2, concurrency: rrConcurrency, wait: true})
	if err != nil {
		return err
	}
	defer n.close()
	c, err := client.New(n.nc, client.Options{})
	if err != nil {
		return err
	}
	defer c.Close()
	goCall := func(ctx context.Context, _ int) error {
		var out json.RawMessage
		return c.Call(ctx, "echo", json.RawMessage(payload), &out)
	}
	watch := map[string][]int{"poolnode": {n.p.pid()}, "workers": n.workers()}
	for _, conc := range []int{1, 64} {
		if st := load(ctx, conc, time.Second, goCall, watch); st.n == 0 {
			return fmt.Errorf("clients: Go client warm-up made no successful call: %v", st.firstErr)
		}
	}
	for r := range h.rounds {
		for _, conc := range []int{1, 64} {
			st := load(ctx, conc, h.duration, goCall, watch)
			h.res.add(clientGroup(conc)+"/go", st)
			h.logf("clients go c%d round %d: %8.0f calls/s  p50 %6.0f µs", conc, r+1, st.rps(), us(st.p50))
		}
		py, err := h.pythonClient(ctx, n.natsURL)
		if err != nil {
			return err
		}
		h.res.add(clientGroup(1)+"/python", py.Call1.stats())
		h.res.add(clientGroup(64)+"/python", py.Async.stats())
		h.logf("clients python round %d: c1 p50 %6.0f µs; 64 in flight %8.0f calls/s", r+1, py.Call1.P50, py.Async.CallsPerS)
	}
	return nil
}

func clientGroup(conc int) string { return "client-c" + strconv.Itoa(conc) }

// pyClientRun is one run of python/bench/client_bench.py.
type pyClientRun struct {
	Calls     int     `json:"calls"`
	Errors    int     `json:"errors"`
	CallsPerS float64 `json:"calls_per_s"`
	P50       float64 `json:"p50_us"`
	P99       float64 `json:"p99_us"`
}

func (p pyClientRun) stats() runStats {
	st := runStats{n: p.Calls, errs: p.Errors, p50: time.Duration(p.P50 * 1e3), p99: time.Duration(p.P99 * 1e3)}
	if p.CallsPerS > 0 {
		st.elapsed = time.Duration(float64(p.Calls) / p.CallsPerS * float64(time.Second))
	}
	return st
}

func (h *harness) pythonClient(ctx context.Context, url string) (struct {
	Call1 pyClientRun `json:"call_1"`
	Async pyClientRun `json:"async"`
}, error) {
	var out struct {
		Call1 pyClientRun `json:"call_1"`
		Async pyClientRun `json:"async"`
	}
	// About h.duration one at a time, as the Go side gets.
	calls := max(200, int(h.duration/time.Millisecond))
	cmd := exec.CommandContext(ctx, h.python, filepath.Join(h.root, "python", "bench", "client_bench.py"),
		"--nats", url, "--calls", strconv.Itoa(calls), "--seconds", strconv.FormatFloat(h.duration.Seconds(), 'f', -1, 64), "--inflight", "64")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	b, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("clients: python/bench/client_bench.py: %w: %s", err, stderr.String())
	}
	if err := json.Unmarshal(b, &out); err != nil {
		return out, fmt.Errorf("clients: python/bench/client_bench.py printed %q: %w", b, err)
	}
	return out, nil
}

// reportClients is figures 9 and 10.
func (h *harness) reportClients(w writer) {
	r := h.res
	if !r.has(clientGroup(1) + "/python") {
		return
	}
	gp, pp := r.med(clientGroup(1)+"/go", p50), r.med(clientGroup(1)+"/python", p50)
	w("| 9 | Python `Client.call`, one at a time, p50 (issue 12) | %.0f µs | Go client (what `submit bench -c 1` runs) %.0f µs | %.2f× | reported | — |\n", pp, gp, pp/gp)
	ga, pa := r.med(clientGroup(64)+"/go", rps), r.med(clientGroup(64)+"/python", rps)
	w("| 10 | Python `AsyncClient`, 64 calls in flight (issue 12) | %s calls/s | Go client, 64 goroutines, %s calls/s | %.2f× | reported | — |\n", commas(pa), commas(ga), pa/ga)
}
