package main

import (
	"context"
	"fmt"
)

// fnArgs measures what a function's signature costs per call through the
// node (issue 13): echo_typed (its body bound and validated by name) and
// echo_ctx (a pyfleet.Context injected) against the plain echo, one call at
// a time (p50) and 16 in flight (throughput), alternating the three. These
// were python/bench/typed_bench.py and context_cost.py's figures, measured
// in process or against a bare worker; here they include the node.
func (h *harness) fnArgs(ctx context.Context) error {
	h.logf("function arguments: starting a node (2 workers, --concurrency %d)", rrConcurrency)
	n, err := h.startNode(ctx, "fnargs", nodeOpts{workers: 2, concurrency: rrConcurrency, wait: true})
	if err != nil {
		return err
	}
	defer n.close()
	watch := map[string][]int{"poolnode": {n.p.pid()}, "workers": n.workers()}
	var vs []variant
	for _, fn := range fnArgsFunctions {
		vs = append(vs, variant{fn, natsCaller(n.nc, "pyfleet.req.default."+fn, payload), watch})
	}
	for _, conc := range []int{1, 16} {
		if err := h.compare(ctx, fmt.Sprintf("fnargs%d", conc), conc, vs, nil); err != nil {
			return err
		}
	}
	return nil
}

var fnArgsFunctions = []string{"echo", "echo_typed", "echo_ctx"}

// reportFnArgs is the fnargs section's rows: each signature's p50 one at a
// time and throughput at 16 in flight, and its ratio to the plain echo.
func (h *harness) reportFnArgs(w writer) {
	r := h.res
	if !r.has("fnargs1/echo") {
		return
	}
	w("\n## Function signatures through the node (issue 13)\n\n")
	w("The bench's 100-byte echo through one node (2 workers, `--concurrency %d`), the three functions alternating: ", rrConcurrency)
	w("`echo(payload)`, `echo_typed(message: str, n: int)` (bound and validated by msgspec) and `echo_ctx(payload, ctx: pyfleet.Context)`.\n\n")
	w("| function | one at a time, p50 | vs echo | 16 in flight | vs echo |\n|---|---|---|---|---|\n")
	base1, base16 := r.med("fnargs1/echo", p50), r.med("fnargs16/echo", rps)
	for _, fn := range fnArgsFunctions {
		l, t := r.med("fnargs1/"+fn, p50), r.med("fnargs16/"+fn, rps)
		w("| `%s` | %.0f µs | %+.0f µs (%.2f×) | %s req/s | %.2f× |\n", fn, l, l-base1, l/base1, commas(t), t/base16)
	}
}
