package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"
)

// results holds every run, in the order they were made.
type results struct {
	order []string
	runs  map[string][]runStats
	vals  map[string][]float64
	// notOffered: the containment modes this machine refused, and why.
	notOffered []string
}

func newResults() *results {
	return &results{runs: map[string][]runStats{}, vals: map[string][]float64{}}
}

func (r *results) add(key string, st runStats) {
	r.order = append(r.order, key)
	r.runs[key] = append(r.runs[key], st)
}

func (r *results) addValue(key string, v float64) {
	r.order = append(r.order, key)
	r.vals[key] = append(r.vals[key], v)
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// med is the median over the runs of key of f.
func (r *results) med(key string, f func(runStats) float64) float64 {
	var xs []float64
	for _, st := range r.runs[key] {
		xs = append(xs, f(st))
	}
	return median(xs)
}

func (r *results) has(key string) bool { return len(r.runs[key]) > 0 || len(r.vals[key]) > 0 }

func rps(st runStats) float64 { return st.rps() }
func p50(st runStats) float64 { return us(st.p50) }
func p99(st runStats) float64 { return us(st.p99) }

func yesNo(ok bool) string {
	if ok {
		return "**yes**"
	}
	return "no"
}

func commas(x float64) string {
	s := fmt.Sprintf("%.0f", x)
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}

func shell(name string, args ...string) string {
	out, err := exec.Command(name, args...).Output()
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(string(out))
}

func cpuModel() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "?"
}

// report is docs/benchmarks.md: the set-up, the table of figures against
// their targets, where the CPU goes, every run, the hand-written notes and
// how each figure is made.
func (h *harness) report(took time.Duration) string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	h.reportHeader(w, took)
	h.reportFigures(w)
	h.reportCPU(w)
	h.reportContainment(w)
	h.reportFnArgs(w)
	h.reportPreload(w)
	h.reportRuns(w)
	if notes, err := os.ReadFile(filepath.Join(h.root, "test", "bench", "notes.md")); err == nil {
		// What the profiles showed and what was changed: written by hand,
		// kept beside the harness so that every run's report carries it.
		w("\n%s", notes)
	}
	reportMethod(w)
	return b.String()
}

// writer appends formatted text to the report.
type writer func(format string, args ...any)

func (h *harness) reportHeader(w writer, took time.Duration) {
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	commit := shell("git", "-C", h.root, "rev-parse", "--short", "HEAD")
	if dirty := shell("git", "-C", h.root, "status", "--porcelain", "--untracked-files=no"); dirty != "" && dirty != "?" {
		commit += " (with uncommitted changes)"
	}
	args := strings.Join(os.Args[1:], " ")
	w("# Benchmarks\n\n")
	w("Written by `make bench` (`test/bench`); every figure is the median of %d runs, ", h.rounds)
	w("pyfleet and its baseline alternating (A B A B), each throughput or latency run %s long.\n\n", h.duration)
	w("- machine: %d cores (`nproc`), %s, Linux %s, shared and noisy\n", runtime.NumCPU(), cpuModel(), strings.TrimSpace(string(kernel)))
	w("- date: %s\n", time.Now().UTC().Format("2006-01-02 15:04 MST"))
	w("- commit: %s\n", commit)
	w("- command: `make bench` (`PYFLEET_TEST_PYTHON=%s go run ./test/bench %s`), took %s\n", h.python, args, took.Round(time.Second))
	w("- %s, %s\n", runtime.Version(), shell(h.python, "--version"))
	if h.autoMode != "" {
		w("- containment: figures 1 to 6 run with the default `--containment auto`, which chose `%s` here\n", h.autoMode)
	}
	w("\n")
}

// reportFigures is the table of every figure against its target.
func (h *harness) reportFigures(w writer) {
	r := h.res
	w("| # | figure | pyfleet | baseline | ratio | target (issue 6) | met |\n")
	w("|---|---|---|---|---|---|---|\n")
	h.reportRequestReply(w)
	if r.has("c1/pyfleet") {
		pf, un, sm := r.med("c1/pyfleet", p50), r.med("c1/unary", p50), r.med("c1/stream", p50)
		w("| 2 | one request at a time, p50 | %.0f µs | direct unary %.0f µs (stream %.0f µs) | +%.0f µs over unary | ≤ ceiling + 150 µs | %s |\n",
			pf, un, sm, pf-un, yesNo(pf <= un+150))
	}
	if r.has("jobs/pyfleet") {
		j := r.med("jobs/pyfleet", rps)
		w("| 3 | jobs through JetStream (file store), each result stored, one node | %s jobs/s | | | ≥ 3,000 jobs/s | %s |\n", commas(j), yesNo(j >= 3000))
	}
	h.reportStartKillMemory(w)
	h.reportContainmentFigures(w)
	h.reportClients(w)
}

// reportRequestReply is figure 1's rows.
func (h *harness) reportRequestReply(w writer) {
	r := h.res
	for _, fn := range []string{"echo", "echo_async"} {
		kind := "`def echo`, on a call thread"
		if fn == "echo_async" {
			kind = "`async def echo_async`, on the event loop"
		}
		for _, conc := range []int{16, 64} {
			g := rrGroup(fn, conc)
			if !r.has(g + "/pyfleet") {
				continue
			}
			pf, un, sm := r.med(g+"/pyfleet", rps), r.med(g+"/unary", rps), r.med(g+"/stream", rps)
			w("| 1 | %s, 100 B, 2 workers, %d in flight | %s req/s (p50 %.0f µs) | direct unary gRPC %s req/s (p50 %.0f µs) | %.2f× | ≥ 1.0× unary and ≥ 12,000 req/s | %s |\n",
				kind, conc, commas(pf), r.med(g+"/pyfleet", p50), commas(un), r.med(g+"/unary", p50), pf/un, yesNo(pf >= un && pf >= 12000))
			w("| 1 | the same, against the stream ceiling | | direct Batches stream %s req/s (p50 %.0f µs) | %.2f× | stretch: ≥ 0.8× stream | %s |\n",
				commas(sm), r.med(g+"/stream", p50), pf/sm, yesNo(pf >= 0.8*sm))
			if r.has(g + "/relay") {
				rl := r.med(g+"/relay", rps)
				w("| 1 | the same, against the relay floor | | bare NATS relay %s req/s (p50 %.0f µs; %.2f× stream) | %.2f× | reported | — |\n",
					commas(rl), r.med(g+"/relay", p50), rl/sm, pf/rl)
			}
		}
	}
}

// reportStartKillMemory is figures 4 to 6's rows.
func (h *harness) reportStartKillMemory(w writer) {
	r := h.res
	for _, size := range []int{8, h.big} {
		k := fmt.Sprintf("start%d", size)
		if !r.has(k + "/pyfleet") {
			continue
		}
		pf, bare := median(r.vals[k+"/pyfleet"]), median(r.vals[k+"/bare"])
		target, met := "", ""
		if size == 100 {
			target, met = "≤ 1.3× bare", yesNo(pf <= 1.3*bare)
		}
		w("| 4 | %d workers ready (node start to the last `ready` event) | %.2f s | %d bare `python -c 'import grpc'`, %d at a time: %.2f s | %.2f× | %s | %s |\n",
			size, pf, size, runtime.NumCPU(), bare, pf/bare, target, met)
	}
	if k := fmt.Sprintf("kill%d/pyfleet", h.big); r.has(k) {
		v := median(r.vals[k])
		w("| 5 | `kill -9` of a node with %d workers to its last process gone | %.0f ms | | | ≤ 1 s | %s |\n", h.big, v*1000, yesNo(v <= 1))
	}
	if k := fmt.Sprintf("rss%d/loaded", h.big); r.has(k) {
		v := median(r.vals[k])
		w("| 6 | poolnode RSS with %d workers (after 1 s of load; idle %.1f MB) | %.1f MB | | | ≤ 60 MB | %s |\n",
			h.big, median(r.vals[fmt.Sprintf("rss%d/idle", h.big)]), v, yesNo(v <= 60))
	}
}

// reportCPU is where the CPU goes, per request.
func (h *harness) reportCPU(w writer) {
	r := h.res
	if !r.has("rr16/pyfleet") && !r.has("c1/pyfleet") && !r.has("jobs/pyfleet") {
		return
	}
	w("\n## CPU per request (µs, medians)\n\n")
	w("Measured from /proc over each run: the node (poolnode, with its embedded NATS server; for the relay floor, the relay with the same embedded server), its Python workers, and the harness (the load generator; for the direct ceilings it is the gRPC client).\n\n")
	w("| run | poolnode (relay) | workers | load generator | total |\n|---|---|---|---|---|\n")
	for _, g := range []string{"rr16", "rr64", "rr16-async", "rr64-async", "c1", "jobs"} {
		for _, v := range []string{"pyfleet", "relay", "unary", "stream"} {
			k := g + "/" + v
			if !r.has(k) {
				continue
			}
			who := "poolnode"
			if v == "relay" {
				who = "relay"
			}
			pn := r.med(k, func(st runStats) float64 { return st.cpuPerReq(who) })
			wk := r.med(k, func(st runStats) float64 { return st.cpuPerReq("workers") })
			hn := r.med(k, func(st runStats) float64 { return st.cpuPerReq("harness") })
			pns := fmt.Sprintf("%.0f", pn)
			switch v {
			case "relay":
				pns = fmt.Sprintf("(%.0f)", pn)
			case "unary", "stream":
				pns = "—"
			}
			w("| %s %s | %s | %.0f | %.0f | %.0f |\n", g, v, pns, wk, hn, pn+wk+hn)
		}
	}
}

// reportRuns lists every run in the order made.
func (h *harness) reportRuns(w writer) {
	r := h.res
	w("\n## Every run, in the order made\n\n")
	w("| run | result |\n|---|---|\n")
	seen := map[string]int{}
	for _, k := range r.order {
		i := seen[k]
		seen[k]++
		if sts := r.runs[k]; i < len(sts) {
			st := sts[i]
			extra := ""
			if st.errs > 0 {
				extra = fmt.Sprintf(", %d errors", st.errs)
			}
			if strings.HasPrefix(k, "jobs") {
				w("| %s | %d jobs in %.2f s: %s jobs/s |\n", k, st.n, st.elapsed.Seconds(), commas(st.rps()))
			} else {
				w("| %s | %s req/s, p50 %.0f µs, p99 %.0f µs%s |\n", k, commas(st.rps()), us(st.p50), us(st.p99), extra)
			}
			continue
		}
		if vs := r.vals[k]; i < len(vs) {
			unit := "s"
			v := vs[i]
			switch {
			case strings.HasPrefix(k, "rss"), strings.HasPrefix(k, "pss"):
				unit = "MB"
			case strings.HasPrefix(k, "kill"), strings.HasPrefix(k, "spawn"), strings.HasPrefix(k, "startcpu"),
				strings.HasPrefix(k, "preloadkill"), strings.HasPrefix(k, "recycle"):
				unit, v = "ms", v*1000
			case strings.HasPrefix(k, "procs"), strings.HasPrefix(k, "survivors"):
				w("| %s | %.0f processes |\n", k, v)
				continue
			}
			w("| %s | %.2f %s |\n", k, v, unit)
		}
	}
}

// reportMethod says how each figure is made.
func reportMethod(w writer) {
	w("\n## How each figure is made\n\n")
	w(`1. A node (` + "`poolnode --workers 2 --concurrency 32`" + `, embedded NATS on a random port) serves test/bench/benchapp.py: ` + "`echo`" + ` (a plain function, which the worker runs on a call thread) and ` + "`echo_async`" + ` (a coroutine, run on its event loop); the harness's own Go NATS client keeps 16 or 64 requests in flight (one goroutine each, one connection) with a 100-byte JSON body. The ceiling: two more workers started the same way (` + "`python -m pyfleet.worker --concurrency 32`" + `, same app, same function path), called from Go over their Unix sockets with the same body and the same number in flight, spread over both workers: once with one unary ` + "`Unary`" + ` RPC per request, once over one long-lived ` + "`Batches`" + ` stream per worker, frames sent as the node sends them (those ready together in one message). The relay floor: the same two workers behind a bare relay process (test/bench/relay.go: the node's embedded NATS server, one plain subscription, each request sent on a worker's ` + "`Batches`" + ` stream as above and answered from the stream's receiver, nothing else), called by the same NATS client as the node: what any bridge from NATS to these workers costs at least. Load generator and workers share the same 2 cores.
2. The same with one request in flight, a node with the default ` + "`--concurrency 1`" + ` and a ceiling worker started with ` + "`--concurrency 1`" + `.
3. A node with 2 workers (` + "`--concurrency 32`" + `) and its embedded NATS (JetStream file store in the node's state dir); the harness publishes N jobs to ` + "`pyfleet.job.default.echo`" + ` (async, each with its own ` + "`Nats-Msg-Id`" + `) and stops the clock when PYFLEET_RESULTS holds all N results; the last result is checked.
4. A node started with ` + "`--nats`" + ` to a NATS server inside the harness: time from starting poolnode to the N-th ` + "`ready`" + ` event. Baseline: N runs of ` + "`python -c 'import grpc'`" + `, as many at a time as there are cores.
5. The same node with 100 workers, SIGKILLed: time until poolnode is reaped and no process carrying its ` + "`PYFLEET_WORKER_RUN=<node>/`" + ` marker is alive (zombies count as gone), scanning /proc every 2 ms.
6. VmRSS of that poolnode (/proc/<pid>/status), read after its workers are ready and after 1 s of echo load at 64 in flight.
7. For each ` + "`--containment`" + ` mode the machine offers, in turn (one further each round): a node started with ` + "`--nats`" + ` to a NATS server inside the harness and 100 workers, each of which starts, as it imports test/bench/benchapp.py, one ` + "`subprocess.Popen([\"sleep\", \"600\"], env={\"PATH\": \"/usr/bin:/bin\"}, start_new_session=True)`" + ` (its argv[0] a tag of the harness's, so that the harness finds its own): a child without the marker and out of the worker's group, which only kernel containment reaches once the node is dead. Ready: node start to the 100th ` + "`ready`" + ` event; the CPU of the node's whole process tree at that moment (node, guardian, inits, workers, children; ns from /proc/<pid>/task/*/schedstat) over 100. Then SIGKILL: time until poolnode is reaped and every process of the run is gone, by pid and start time (zombies count as gone), scanning every 2 ms: the node's tree as it was before the kill and every process carrying its marker. In ` + "`group`" + ` mode the clean-environment children are not waited for: those alive once the rest is gone are counted (the mode's known limit) and killed by the harness. After each kill the run's cgroups must be gone too.
8. For each mode, a node with one worker and ` + "`--max-requests 1`" + `: a call to the node makes it start a replacement, timed from the call's answer to the replacement's ` + "`ready`" + ` event, with its CPU: the node's from the call to that event and the new worker's whole tree's (its init's too); the old worker is gone before the next call, and the modes take turns (the three nodes live side by side and only one starts a worker at a time). The difference to ` + "`group`" + ` is the median of the differences within each turn, which a slow spell of the machine shifts for all modes alike.
9. and 10. One node (2 workers, ` + "`--concurrency 32`" + `, embedded NATS); each round, in turn, the Go client (package ` + "`client`" + `, which ` + "`submit`" + ` is built on) one call at a time and with 64 goroutines, then python/bench/client_bench.py: ` + "`Client.call`" + ` one at a time (as many calls as the Go side's run lasts in ms), then ` + "`AsyncClient.call`" + ` with 64 in flight for the same duration. The same 100-byte echo; heartbeats on in both, as by default. The Python process runs on the same 2 cores as the node.
`)
}

// diffSpread is medianDiff in ms with the middle half of the differences,
// which says whether the machine's noise lets a few ms be told apart.
func diffSpread(a, b []float64) string {
	var d []float64
	for i := range min(len(a), len(b)) {
		d = append(d, (a[i]-b[i])*1000)
	}
	slices.Sort(d)
	if len(d) < 4 {
		return fmt.Sprintf("%+.1f ms", median(d))
	}
	return fmt.Sprintf("%+.1f ms, middle half %+.0f to %+.0f", median(d), d[len(d)/4], d[len(d)*3/4])
}

// medianDiff is the median of a[i] - b[i]: runs made in turn, so that a
// slow spell of a shared machine, which shifts both, cancels out.
func medianDiff(a, b []float64) float64 {
	var d []float64
	for i := range min(len(a), len(b)) {
		d = append(d, a[i]-b[i])
	}
	return median(d)
}

// reportContainmentFigures is figures 7 and 8's rows (issue 10).
func (h *harness) reportContainmentFigures(w writer) {
	r := h.res
	for _, mode := range containModes {
		k := h.ckey("kill", mode)
		if !r.has(k) {
			continue
		}
		v, extra := median(r.vals[k]), ""
		if mode == "group" {
			extra = fmt.Sprintf("; %.0f of %d clean-environment children left alive (the mode's known limit), killed by the bench",
				median(r.vals[h.ckey("survivors", mode)]), h.big)
		}
		w("| 7 | `kill -9` of a node with %d workers, each with a clean-environment `setsid` child, to the last process of the run gone, `--containment %s` | %.0f ms%s | | | ≤ 1 s (issue 10) | %s |\n",
			h.big, mode, v*1000, extra, yesNo(v <= 1))
	}
	g := r.vals[spawnKey("group")]
	for _, mode := range containModes[:2] {
		k := spawnKey(mode)
		if !r.has(k) || len(g) == 0 {
			continue
		}
		c, gc := r.vals[spawnCPUKey(mode)], r.vals[spawnCPUKey("group")]
		d, dc := medianDiff(r.vals[k], g)*1000, medianDiff(c, gc)*1000
		w("| 8 | one worker's spawn to ready, alone, `--containment %s` | %.1f ms (CPU %.1f ms) | `group` %.1f ms (CPU %.1f ms) | %s (CPU %s) | < 5 ms added (issue 10) | %s |\n",
			mode, median(r.vals[k])*1000, median(c)*1000, median(g)*1000, median(gc)*1000,
			diffSpread(r.vals[k], g), diffSpread(c, gc), yesNo(d < 5 && dc < 5))
	}
}

// reportContainment is the table of every containment mode (issue 10).
func (h *harness) reportContainment(w writer) {
	r := h.res
	if !r.has(h.ckey("kill", "group")) {
		return
	}
	w("\n## Containment modes (issue 10, medians)\n\n")
	w("Figures 7 and 8 for each `--containment` mode, against `group`; with %d workers, each with a clean-environment `setsid` child. ", h.big)
	if len(r.notOffered) > 0 {
		w("Not offered by this machine: %s.", strings.Join(r.notOffered, "; "))
	} else {
		w("This machine offers every mode.")
	}
	w("\n\n| mode | processes of the run | `kill -9` to last process gone | clean-environment children left | %d workers ready | added a worker (ready time / %d) | CPU a worker start (whole tree) | added | one worker alone, spawn to ready | added | its CPU | added |\n", h.big, h.big)
	w("|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	med := func(kind, mode string) float64 { return median(r.vals[h.ckey(kind, mode)]) }
	diff := func(kind, mode string) float64 {
		return medianDiff(r.vals[h.ckey(kind, mode)], r.vals[h.ckey(kind, "group")])
	}
	for _, mode := range containModes {
		if !r.has(h.ckey("kill", mode)) {
			continue
		}
		left := "0 (all waited for)"
		if mode == "group" {
			left = fmt.Sprintf("%.0f (known limit)", med("survivors", mode))
		}
		added := func(s string) string {
			if mode == "group" {
				return "—"
			}
			return s
		}
		alone := func(key func(string) string) string {
			return fmt.Sprintf("%.1f ms | %s", median(r.vals[key(mode)])*1000,
				added(fmt.Sprintf("%+.1f ms", medianDiff(r.vals[key(mode)], r.vals[key("group")])*1000)))
		}
		w("| `%s` | %.0f | %.0f ms | %s | %.2f s | %s | %.1f ms | %s | %s | %s |\n",
			mode, med("procs", mode), med("kill", mode)*1000, left, med("ready", mode),
			added(fmt.Sprintf("%+.1f ms (%.2f×)", diff("ready", mode)*1000/float64(h.big), med("ready", mode)/med("ready", "group"))),
			med("startcpu", mode)*1000, added(fmt.Sprintf("%+.1f ms", diff("startcpu", mode)*1000)),
			alone(spawnKey), alone(spawnCPUKey))
	}
}
