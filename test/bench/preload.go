package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
)

// preloadBench is the "preload" section (issue 14): workers ready with
// --preload beside bare interpreter starts, a recycle's replacement, the
// PSS of workers of an app that imports numpy with and without preload,
// and kill -9 of a node with h.big preloaded workers to its last process
// gone. Each figure is taken in each of preloadModes, both sides (preload
// and plain) in the same mode.
//
// parts picks among "start", "recycle" and "pss" (sections preload-start,
// ...; "preload" is all three), for a machine too loaded to run them all
// within make bench's budget.
// preloadModes are the --containment modes the section measures: group,
// the figures' reference since preload first came, and the host's default
// (auto: on a root host cgroup with a PID namespace per worker), in which
// a forked worker gets its own namespace under an init that adopts it, as a
// started one does under the init it is started by (README "Preloaded
// workers").
var preloadModes = []string{"group", "auto"}

// modeKey is key for mode: group's figures keep the names they had before
// the default mode was measured too.
func modeKey(mode, key string) string {
	if mode == "group" {
		return key
	}
	return key + "@" + mode
}

func (h *harness) preloadBench(ctx context.Context, parts ...string) error {
	if len(parts) == 0 {
		parts = []string{"start", "recycle", "pss"}
	}
	doing := func(p string) bool { return slices.Contains(parts, p) }
	url, nc, stop, err := h.harnessNATS("nats-preload")
	if err != nil {
		return err
	}
	defer stop()
	for r := range h.rounds {
		for _, size := range []int{8, h.big} {
			if !doing("start") {
				break
			}
			d, err := h.bare(ctx, size)
			if err != nil {
				return err
			}
			if size == 8 {
				lib, err := h.libraryImport(ctx)
				if err != nil {
					return err
				}
				h.res.addValue("preload/libraries", lib.Seconds())
				h.logf("preload round %d: python -c %q: %.3f s", r+1, workerLibraries, lib.Seconds())
			}
			h.res.addValue(fmt.Sprintf("preload%d/bare", size), d.Seconds())
			h.logf("preload %d round %d: bare `import grpc` x%d: %.3f s", size, r+1, size, d.Seconds())
			for _, mode := range preloadModes {
				for _, pre := range []bool{false, true} {
					if err := h.preloadLife(ctx, nc, url, size, r, pre, mode); err != nil {
						return err
					}
				}
			}
		}
		for _, mode := range preloadModes {
			for _, pre := range []bool{false, true} {
				if !doing("recycle") {
					break
				}
				if err := h.recycleTime(ctx, nc, url, r, pre, mode); err != nil {
					return err
				}
			}
			for _, pre := range []bool{false, true} {
				if !doing("pss") {
					break
				}
				if err := h.pss(ctx, url, r, pre, mode); err != nil {
					return err
				}
			}
		}
	}
	h.reportPreloadLog()
	return nil
}

func side(pre bool) string {
	if pre {
		return "preload"
	}
	return "plain"
}

// workerLibraries imports what every worker needs before it can serve,
// pyfleet's own code aside: the least any template has to import.
const workerLibraries = "import asyncio, grpc, grpc.aio, google.protobuf.message, msgspec"

// libraryImport is one interpreter importing workerLibraries, alone on the
// machine as a node's template is at its start.
func (h *harness) libraryImport(ctx context.Context) (time.Duration, error) {
	cmd := exec.CommandContext(ctx, h.python, "-c", workerLibraries)
	cmd.Dir = h.root
	cmd.Env = childEnv()
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	start := time.Now()
	if out, err := cmd.CombinedOutput(); err != nil {
		return 0, fmt.Errorf("python -c %q: %w: %s", workerLibraries, err, out)
	}
	return time.Since(start), nil
}

// preloadLife times size workers to ready and a kill -9 of their node to
// its last process gone.
func (h *harness) preloadLife(ctx context.Context, nc *nats.Conn, url string, size, round int, pre bool, mode string) error {
	short := fmt.Sprintf("pre%d-%s-%s-%d", size, mode, side(pre), round)
	name := h.id + "-" + short
	evs := make(chan *nats.Msg, size*4+16)
	sub, err := nc.ChanSubscribe("pyfleet.evt.default."+name+".*", evs)
	if err != nil {
		return err
	}
	defer sub.Unsubscribe()
	if err := nc.Flush(); err != nil {
		return err
	}
	// The template's spawned event comes once it has imported the app:
	// from then on the figure is the forks' alone.
	var templateAt, lastReady time.Time
	start := time.Now()
	n, err := h.startNode(ctx, short, nodeOpts{workers: size, concurrency: 1, natsURL: url, containment: mode, preload: pre})
	if err != nil {
		return err
	}
	defer n.close()
	for got := 0; got < size; {
		select {
		case m := <-evs:
			var e struct {
				Kind   string    `json:"kind"`
				TS     time.Time `json:"ts"`
				Worker string    `json:"worker"`
			}
			if json.Unmarshal(m.Data, &e) != nil {
				continue
			}
			switch {
			case e.Kind == "spawned" && e.Worker == "template":
				templateAt = e.TS
			case e.Kind == "ready":
				got++
				lastReady = e.TS
			}
		case <-n.p.done:
			return fmt.Errorf("node with %d workers exited before they were ready:\n%s", size, n.p.tail())
		case <-time.After(4 * time.Minute):
			return fmt.Errorf("only %d of %d workers ready in 4 minutes", got, size)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	took := time.Since(start)
	h.res.addValue(modeKey(mode, fmt.Sprintf("preload%d/%s", size, side(pre))), took.Seconds())
	h.logf("preload %d round %d, --containment %s: %s node ready with %d workers in %.3f s", size, round+1, mode, side(pre), size, took.Seconds())
	if pre {
		if templateAt.IsZero() {
			return fmt.Errorf("preload %d: no template served:\n%s", size, n.p.tail())
		}
		forks := lastReady.Sub(templateAt)
		h.res.addValue(modeKey(mode, fmt.Sprintf("preload%d/forks", size)), forks.Seconds())
		h.res.addValue(modeKey(mode, fmt.Sprintf("preload%d/template", size)), templateAt.Sub(start).Seconds())
		h.logf("preload %d round %d, --containment %s: template ready to %d workers ready %.3f s", size, round+1, mode, size, forks.Seconds())
	}
	if err := n.waitServing(ctx, time.Minute); err != nil {
		return err
	}
	if mode == "auto" && h.autoMode == "" {
		if h.autoMode, err = serviceMode(nc, name); err != nil {
			return err
		}
	}
	if size < h.big || !pre {
		return nil
	}
	if marked := markedPIDs(name + "/"); len(marked) < size {
		return fmt.Errorf("found %d marked processes of a node with %d workers", len(marked), size)
	}
	t0 := time.Now()
	_ = syscall.Kill(n.p.pid(), syscall.SIGKILL)
	for !n.p.exited() || len(markedPIDs(name+"/")) > 0 {
		if time.Since(t0) > 30*time.Second {
			return fmt.Errorf("processes of the killed node still alive after 30 s: %v", markedPIDs(name+"/"))
		}
		time.Sleep(2 * time.Millisecond)
	}
	gone := time.Since(t0)
	h.res.addValue(modeKey(mode, fmt.Sprintf("preloadkill%d", size)), gone.Seconds())
	h.logf("preload kill %d round %d, --containment %s: all processes gone %.0f ms after SIGKILL", size, round+1, mode, gone.Seconds()*1000)
	return nil
}

// recycleTime: one worker with --max-requests 1 is replaced after every
// call; the figure is each replacement's spawned to ready (its events'
// timestamps), the median of a few.
func (h *harness) recycleTime(ctx context.Context, nc *nats.Conn, url string, round int, pre bool, mode string) error {
	short := fmt.Sprintf("recyc-%s-%s-%d", mode, side(pre), round)
	name := h.id + "-" + short
	evs := make(chan *nats.Msg, 256)
	sub, err := nc.ChanSubscribe("pyfleet.evt.default."+name+".*", evs)
	if err != nil {
		return err
	}
	defer sub.Unsubscribe()
	if err := nc.Flush(); err != nil {
		return err
	}
	n, err := h.startNode(ctx, short, nodeOpts{workers: 1, concurrency: 1, natsURL: url, containment: mode, preload: pre, maxRequests: 1, wait: true})
	if err != nil {
		return err
	}
	defer n.close()
	type ev struct {
		Kind   string    `json:"kind"`
		TS     time.Time `json:"ts"`
		PID    int       `json:"pid"`
		Worker string    `json:"worker"`
	}
	spawned := map[int]time.Time{}
	var took []float64
	const want = 5
	deadline := time.Now().Add(2 * time.Minute)
	for len(took) < want && time.Now().Before(deadline) {
		// Each answered call recycles the worker; a call that comes
		// while only the old one is retiring waits for the new one.
		if _, err := n.nc.Request(echoSubject, payload, 30*time.Second); err != nil {
			return fmt.Errorf("recycle %s: %w", side(pre), err)
		}
	drain:
		for {
			select {
			case m := <-evs:
				var e ev
				if json.Unmarshal(m.Data, &e) != nil || e.Worker != "w1" {
					continue
				}
				switch e.Kind {
				case "spawned":
					spawned[e.PID] = e.TS
				case "ready":
					if t0, ok := spawned[e.PID]; ok && len(spawned) > 1 {
						took = append(took, e.TS.Sub(t0).Seconds())
					}
				}
			case <-time.After(300 * time.Millisecond):
				break drain
			}
		}
	}
	if len(took) == 0 {
		return fmt.Errorf("recycle %s: no replacement seen", side(pre))
	}
	med := median(took)
	h.res.addValue(modeKey(mode, "recycle/"+side(pre)), med)
	h.logf("recycle round %d, --containment %s: %s replacement spawned to ready %.1f ms (median of %d)", round+1, mode, side(pre), med*1000, len(took))
	return nil
}

// pss: 8 workers of an app importing numpy; PSS (smaps_rollup) per worker,
// and with preload also the template's, shared by the workers. The Python
// workers' alone: in the PID namespace modes each also has an init, the
// same with and without preload.
func (h *harness) pss(ctx context.Context, url string, round int, pre bool, mode string) error {
	const size = 8
	short := fmt.Sprintf("pss-%s-%s-%d", mode, side(pre), round)
	// numpy's OpenBLAS starts a thread per core at import, which preload
	// refuses to fork over (README "Preloaded workers"); one BLAS thread
	// per worker process is also what a process per core wants. Both
	// sides run with it.
	n, err := h.startNode(ctx, short, nodeOpts{workers: size, concurrency: 1, natsURL: url, containment: mode, preload: pre, app: "numpyapp", wait: true,
		env: []string{"OPENBLAS_NUM_THREADS=1"}})
	if err != nil {
		return err
	}
	defer n.close()
	ws := n.workers()
	if len(ws) != size {
		return fmt.Errorf("pss %s: %d workers, want %d", side(pre), len(ws), size)
	}
	var sum float64
	for _, pid := range ws {
		kb, err := pssKB(pid)
		if err != nil {
			return err
		}
		sum += kb
	}
	per := sum / size / 1024
	var tmpl float64
	for _, pid := range childrenOf(n.p.pid()) {
		if b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline"); strings.Contains(string(b), "pyfleet.template") {
			kb, _ := pssKB(pid)
			tmpl += kb / 1024
		}
	}
	h.res.addValue(modeKey(mode, "pss/"+side(pre)), per)
	h.res.addValue(modeKey(mode, "pssall/"+side(pre)), (sum/1024+tmpl)/size)
	h.logf("pss round %d, --containment %s: %s numpy workers %.1f MB PSS each; with the template's %.1f MB shared out: %.1f MB each",
		round+1, mode, side(pre), per, tmpl, (sum/1024+tmpl)/size)
	return nil
}

// pssKB is the Pss line of /proc/<pid>/smaps_rollup.
func pssKB(pid int) (float64, error) {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "smaps_rollup"))
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(line, "Pss:"); ok {
			f := strings.Fields(rest)
			if len(f) > 0 {
				return strconv.ParseFloat(f[0], 64)
			}
		}
	}
	return 0, fmt.Errorf("no Pss in smaps_rollup of %d", pid)
}

// reportPreloadLog logs the section's medians and ratios, per mode.
func (h *harness) reportPreloadLog() {
	for _, mode := range preloadModes {
		m := func(key string) float64 { return median(h.res.vals[modeKey(mode, key)]) }
		for _, size := range []int{8, h.big} {
			bare := median(h.res.vals[fmt.Sprintf("preload%d/bare", size)])
			plain, pre := m(fmt.Sprintf("preload%d/plain", size)), m(fmt.Sprintf("preload%d/preload", size))
			forks := m(fmt.Sprintf("preload%d/forks", size))
			h.logf("PRELOAD --containment %s: %d workers ready (node start to last ready): preload %.3f s, plain %.3f s, bare starts %.3f s; preload/bare %.2fx, preload/plain %.2fx; template ready to last worker ready %.3f s (%.2fx bare)",
				mode, size, pre, plain, bare, pre/bare, pre/plain, forks, forks/bare)
		}
		h.logf("PRELOAD --containment %s: recycle replacement ready: preload %.1f ms, plain %.1f ms", mode, m("recycle/preload")*1000, m("recycle/plain")*1000)
		h.logf("PRELOAD --containment %s: PSS per numpy worker: preload %.1f MB (%.1f MB with the template shared out), plain %.1f MB (%.1f MB); preload/plain %.2fx (%.2fx)",
			mode, m("pss/preload"), m("pssall/preload"), m("pss/plain"), m("pssall/plain"), m("pss/preload")/m("pss/plain"), m("pssall/preload")/m("pssall/plain"))
		h.logf("PRELOAD --containment %s: kill -9 with %d preloaded workers to last process gone: %.0f ms", mode, h.big, m(fmt.Sprintf("preloadkill%d", h.big))*1000)
	}
}

// reportPreload is the preload section's tables, one per mode, against
// issue 14's targets. Ready is counted two ways: from the node's start
// (what an operator waits for, the template's own import included) and from
// the template being ready (what forking costs, the figure a recycle or a
// restart pays once the template serves).
func (h *harness) reportPreload(w writer) {
	for _, mode := range preloadModes {
		h.reportPreloadMode(w, mode)
	}
}

func (h *harness) reportPreloadMode(w writer, mode string) {
	r := h.res
	key := func(k string) string { return modeKey(mode, k) }
	big := fmt.Sprintf("preload%d", h.big)
	if !r.has(key(big+"/preload")) && !r.has(key("recycle/preload")) && !r.has(key("pss/preload")) {
		return
	}
	m := func(k string) float64 { return median(r.vals[key(k)]) }
	title := "`--containment group`"
	if mode != "group" {
		title = fmt.Sprintf("`--containment %s`", mode)
		if mode == "auto" && h.autoMode != "" {
			title += fmt.Sprintf(", which chose `%s` here", h.autoMode)
		}
	}
	w("\n## Preloaded workers (issue 14, medians, %s)\n\n", title)
	w("| figure | `--preload` | plain starts | bare interpreter starts | preload / bare | target | met |\n|---|---|---|---|---|---|---|\n")
	for _, size := range []int{h.big, 8} {
		k := fmt.Sprintf("preload%d", size)
		if !r.has(key(k + "/preload")) {
			continue
		}
		pre, plain, bare, forks := m(k+"/preload"), m(k+"/plain"), median(r.vals[k+"/bare"]), m(k+"/forks")
		target, met, ftarget, fmet := "", "", "", ""
		if size == h.big {
			target, met = "≤ 1.0 s and ≤ 0.25× bare", yesNo(pre <= 1 && pre <= 0.25*bare)
			ftarget, fmet = target, yesNo(forks <= 1 && forks <= 0.25*bare)
		} else {
			target, met = "≤ 150 ms", yesNo(pre <= 0.15)
			ftarget, fmet = target, yesNo(forks <= 0.15)
		}
		w("| %d workers ready, node start to the last `ready` | %.2f s | %.2f s | %.2f s | %.2f× | %s | %s |\n", size, pre, plain, bare, pre/bare, target, met)
		w("| %d workers ready, template ready to the last `ready` | %.2f s | | | %.2f× | %s | %s |\n", size, forks, forks/bare, ftarget, fmet)
		if size == 8 && r.has(key(k+"/template")) && r.has("preload/libraries") {
			w("| the template ready, node start to its `spawned` event | %.2f s | | the libraries alone (`python -c '%s'`) %.2f s | | reported | — |\n",
				m(k+"/template"), workerLibraries, median(r.vals["preload/libraries"]))
		}
	}
	if r.has(key("recycle/preload")) {
		v := m("recycle/preload")
		w("| a recycle, replacement spawned to ready | %.1f ms | %.1f ms | | | ≤ 50 ms | %s |\n", v*1000, m("recycle/plain")*1000, yesNo(v <= 0.05))
	}
	if r.has(key("pss/preload")) {
		pre, plain := m("pss/preload"), m("pss/plain")
		w("| PSS per worker of an app importing numpy (template's share counted: %.1f MB vs %.1f MB, %.2f×) | %.1f MB | %.1f MB | | %.2f× plain | ≤ 0.5× plain | %s |\n",
			m("pssall/preload"), m("pssall/plain"), m("pssall/preload")/m("pssall/plain"), pre, plain, pre/plain, yesNo(pre <= 0.5*plain))
	}
	if k := fmt.Sprintf("preloadkill%d", h.big); r.has(key(k)) {
		v := m(k)
		w("| `kill -9` of a node with %d preloaded workers to its last process gone | %.0f ms | | | | ≤ 1 s | %s |\n", h.big, v*1000, yesNo(v <= 1))
	}
}
