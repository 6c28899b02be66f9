package test

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/pyfleet/pyfleet/lifecycle"
	"github.com/pyfleet/pyfleet/pool"
)

// isTemplate reports whether pid runs a --preload template
// (python/pyfleet/template.py): marked like a worker, but no worker.
func isTemplate(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return false
	}
	args := strings.Split(string(b), "\x00")
	return len(args) > 2 && args[1] == "-m" && args[2] == "pyfleet.template"
}

// environOf is pid's environment as /proc shows it: what the node's
// lifecycle code reads for marks.
func environOf(t *testing.T, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/environ")
	if err != nil {
		t.Fatalf("environ of %d: %v", pid, err)
	}
	env := map[string]string{}
	for kv := range bytes.SplitSeq(b, []byte{0}) {
		if k, v, ok := bytes.Cut(kv, []byte{'='}); ok {
			env[string(k)] = string(v)
		}
	}
	return env
}

// templatesOf lists the node's live template processes.
func templatesOf(n *nodeProc) []int {
	var out []int
	for _, id := range n.processes() {
		if isTemplate(id.PID) {
			out = append(out, id.PID)
		}
	}
	return out
}

// A preloaded worker is what a spawned one is: a child of the node (which
// reaps it), leader of its own process group, with its own marks and
// command line in /proc; the template is owned and marked like a worker,
// and restarted when it dies, while workers keep being replaced.
func TestPreloadWorkersAreLikeSpawnedOnes(t *testing.T) {
	n := startNode(t, nodeOptions{app: nastyApp(), workers: 3, preload: true})
	nc := n.connect()
	ev := watchEvents(t, nc, "default")
	node := n.cmd.Process.Pid

	templates := templatesOf(n)
	if len(templates) != 1 {
		t.Fatalf("want one template, have %v", templates)
	}
	tmpl := templates[0]
	if pi, err := readProcInfo(tmpl); err != nil || pi.ppid != node || pi.pgrp != tmpl {
		t.Fatalf("template %d: %+v %v; want a child of the node %d leading its own group", tmpl, pi, err, node)
	}
	tmplID := environOf(t, tmpl)[lifecycle.EnvWorkerID]
	if !strings.Contains(tmplID, "/"+pool.TemplateWorker+"-") {
		t.Fatalf("template's %s = %q", lifecycle.EnvWorkerID, tmplID)
	}

	workers := n.workerPIDs()
	if len(workers) != 3 {
		t.Fatalf("want 3 workers (children of the node leading their groups), have %v", workers)
	}
	ids := map[string]bool{}
	for _, pid := range workers {
		env := environOf(t, pid)
		id := env[lifecycle.EnvWorkerID]
		if id == "" || id == tmplID || ids[id] || env[lifecycle.EnvWorkerSpawn] == "" {
			t.Errorf("worker %d has marks %q (spawn %q); the template's are %q", pid, id, env[lifecycle.EnvWorkerSpawn], tmplID)
		}
		ids[id] = true
		if _, ok := env["PYFLEET_TEMPLATE_PAD"]; ok {
			t.Errorf("worker %d still shows the template's padding in its environ", pid)
		}
	}
	// In the PID namespace modes (this host's default) the node
	// supervises each worker's init, whose child the worker is.
	pys := n.pythonPIDs(t)
	if len(pys) != 3 {
		t.Fatalf("want 3 Python workers, have %v", pys)
	}
	for _, pid := range pys {
		if !isPythonWorker(pid) {
			b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
			t.Errorf("worker %d's cmdline is %q, not pyfleet.worker's", pid, b)
		}
		if sup := supervisedOf(t, pid); !slices.Contains(workers, sup) {
			t.Errorf("worker %d is supervised as %d, not one of %v", pid, sup, workers)
		}
	}

	var sp spawnReply
	callOK(t, nc, fnSubject("spawn"), `{}`, &sp)
	if !slices.Contains(pys, sp.PID) {
		t.Fatalf("the call ran in %d, not in a worker of %v", sp.PID, pys)
	}
	n.tree(t, sp.PID, sp.Child)

	// The template dies: it is restarted; meanwhile and after, workers
	// that die are replaced.
	if err := syscall.Kill(tmpl, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	ev.waitFor(30*time.Second, func(e lifecycle.Event) bool {
		return e.Kind == lifecycle.KindCrashed && e.Worker == pool.TemplateWorker && e.PID == tmpl
	})
	ev.waitFor(30*time.Second, func(e lifecycle.Event) bool {
		return e.Kind == lifecycle.KindSpawned && e.Worker == pool.TemplateWorker && e.PID != tmpl
	})
	child := identify(t, sp.Child)
	if err := syscall.Kill(sp.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	ev.waitFor(30*time.Second, func(e lifecycle.Event) bool {
		return e.Kind == lifecycle.KindRestarted && e.PID != sp.PID
	})
	assertGone(t, "the killed worker's child", child, 5*time.Second)
	deadline := time.Now().Add(30 * time.Second)
	for len(n.workerPIDs()) != 3 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if w := n.workerPIDs(); len(w) != 3 {
		t.Fatalf("want 3 workers after the restart, have %v", w)
	}
	callOK(t, nc, fnSubject("pid"), `{}`, nil)

	n.signal(syscall.SIGTERM)
	if code := n.wait(30 * time.Second); code != 0 {
		t.Fatalf("exit status %d, want 0", code)
	}
	n.assertNoLeftovers(time.Second)
}

// Where preloading is unsafe the node says why, once, and starts workers
// plainly: threads alive after the app's import (here in the host's
// default containment, which preloads otherwise).
func TestPreloadFallsBackToPlainStarts(t *testing.T) {
	t.Run("ThreadsAtImport", func(t *testing.T) {
		dir := t.TempDir()
		app := filepath.Join(dir, "threaded.py")
		src := `import threading, time
from pyfleet import App

app = App()
threading.Thread(target=time.sleep, args=(3600,), name="import-time-poller", daemon=True).start()


@app.function
def hello(payload):
    return {"ok": True}
`
		if err := writeFile(app, src); err != nil {
			t.Fatal(err)
		}
		n := startNode(t, nodeOptions{app: app, workers: 2, extra: []string{"--preload"}})
		nc := n.connect()
		callOK(t, nc, fnSubject("hello"), `{}`, nil)
		logs := n.log()
		if c := strings.Count(logs, "preload is off: workers start plainly"); c != 1 || !strings.Contains(logs, "import-time-poller") {
			t.Fatalf("want one warning naming the thread import-time-poller, have %d:\n%s", c, logs)
		}
		if tp := templatesOf(n); len(tp) != 0 {
			t.Fatalf("templates %v still run", tp)
		}
		if w := n.workerPIDs(); len(w) != 2 {
			t.Fatalf("want 2 plainly started workers, have %v", w)
		}
	})
}

// Every containment mode preloads (README "Preloaded workers"): in the PID
// namespace modes the template runs in the node's namespace and each worker
// forked from it runs under its own init, PID 1 of its own namespace, as a
// spawned one does. No warning, no fallback.
func TestPreloadInPIDNamespaces(t *testing.T) {
	if _, err := lifecycle.NewPIDNSContainment(lifecycle.Marker{}); err != nil {
		t.Fatalf("this host must offer PID namespaces: %v", err)
	}
	modes := []string{lifecycle.ModePIDNS}
	if os.Geteuid() == 0 {
		modes = append(modes, lifecycle.ModeCgroup)
	}
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			n := startNode(t, nodeOptions{app: nastyApp(), workers: 2, preload: true, extra: []string{"--containment", mode}})
			nc := n.connect()
			templates := templatesOf(n)
			if len(templates) != 1 {
				t.Fatalf("want one template, have %v", templates)
			}
			if ns := nsPIDs(t, templates[0]); len(ns) != 1 {
				t.Errorf("the template has NSpid %v: want it in the node's namespace", ns)
			}
			inits := n.workerPIDs()
			if len(inits) != 2 || !isInit(inits[0]) || !isInit(inits[1]) {
				t.Fatalf("the node supervises %v, want two inits", inits)
			}
			pys := n.pythonPIDs(t)
			if len(pys) != 2 {
				t.Fatalf("python workers %v, want 2", pys)
			}
			for _, py := range pys {
				if ns := nsPIDs(t, py); len(ns) != 2 || ns[1] != 2 {
					t.Errorf("worker %d has NSpid %v, want 2 levels, pid 2 inside", py, ns)
				}
			}
			var who struct {
				PID int `json:"pid"`
			}
			callOK(t, nc, fnSubject("pid"), `{}`, &who)
			if !slices.Contains(pys, who.PID) {
				t.Errorf("the call ran in %d, not in a worker of %v", who.PID, pys)
			}
			n.signal(syscall.SIGTERM)
			if code := n.wait(30 * time.Second); code != 0 {
				t.Fatalf("exit status %d, want 0", code)
			}
			n.assertNoLeftovers(time.Second)
		})
	}
}

// inBothModes runs test with workers started plainly, then with --preload
// (README "Preloaded workers"), so that what holds for spawned workers is
// checked for preloaded ones too, in whatever containment the test asks
// for.
func inBothModes(t *testing.T, test func(t *testing.T, preload bool)) {
	t.Run("Spawned", func(t *testing.T) { test(t, false) })
	t.Run("Preloaded", func(t *testing.T) { test(t, true) })
}

// SIGHUP picks up a changed app: a new template, then a rolling recycle of
// the workers, with calls in flight the whole time and none failed.
// TestPreloadReloadOnSIGHUP reloads a changed app with calls in flight:
// preloaded workers on SIGHUP, plain ones on `submit reload` (the node
// control request), none of the calls failing.
func TestPreloadReloadOnSIGHUP(t *testing.T) {
	t.Run("SIGHUP/preloaded", func(t *testing.T) {
		reloadWithCallsInFlight(t, true, func(n *nodeProc) {
			n.signal(syscall.SIGHUP)
		})
	})
	t.Run("submit reload/spawned", func(t *testing.T) {
		reloadWithCallsInFlight(t, false, func(n *nodeProc) {
			out, errOut, code := runSubmit(t, n.url, "", "reload", "--pool", "default")
			if code != 0 || !strings.HasPrefix(out, "reloaded "+n.name+" in ") {
				t.Errorf("submit reload: exit %d, stdout %q, stderr %q", code, out, errOut)
			}
		})
	})
}

func reloadWithCallsInFlight(t *testing.T, preload bool, reload func(*nodeProc)) {
	dir := t.TempDir()
	app := filepath.Join(dir, "versioned.py")
	src := func(version string) string {
		return `import time
from pyfleet import App

app = App()


@app.function
def version(payload):
    time.sleep(0.02)
    return {"version": "` + version + `"}
`
	}
	if err := writeFile(app, src("v1")); err != nil {
		t.Fatal(err)
	}
	n := startNode(t, nodeOptions{app: app, workers: 2, preload: preload})
	nc := n.connect()
	oldTemplates := templatesOf(n)
	oldWorkers := n.workerPIDs()

	// A different size, so that no stale bytecode is taken for it.
	if err := writeFile(app, src("v2-reloaded")); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	type outcome struct {
		calls   int
		failed  []string
		version map[string]int
	}
	results := make(chan outcome, 4)
	var answered atomic.Int64
	for range 4 {
		go func() {
			o := outcome{version: map[string]int{}}
			defer func() { results <- o }()
			for {
				select {
				case <-stop:
					return
				default:
				}
				msg, err := request(nc, fnSubject("version"), `{}`, 30*time.Second)
				o.calls++
				answered.Add(1)
				if err != nil {
					o.failed = append(o.failed, err.Error())
					continue
				}
				if st := msg.Header.Get("Pyfleet-Status"); st != "ok" {
					o.failed = append(o.failed, st+": "+string(msg.Data))
					continue
				}
				var v struct{ Version string }
				_ = json.Unmarshal(msg.Data, &v)
				o.version[v.Version]++
			}
		}()
	}
	// Calls are in flight before the reload starts.
	deadline := time.Now().Add(60 * time.Second)
	for answered.Load() < 4 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	reload(n)
	for !n.hasLog("reloaded", nil) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	close(stop)
	total := outcome{version: map[string]int{}}
	for range 4 {
		o := <-results
		total.calls += o.calls
		total.failed = append(total.failed, o.failed...)
		for k, v := range o.version {
			total.version[k] += v
		}
	}
	if !n.hasLog("reloaded", nil) {
		t.Fatalf("no reload within 60 s")
	}
	if len(total.failed) > 0 {
		t.Fatalf("%d of %d calls failed during the reload: %v", len(total.failed), total.calls, total.failed)
	}
	var v struct{ Version string }
	callOK(t, nc, fnSubject("version"), `{}`, &v)
	if v.Version != "v2-reloaded" {
		t.Fatalf("after the reload the app answers %q, want v2-reloaded (calls during it: %v)", v.Version, total.version)
	}
	if now := templatesOf(n); preload && (len(now) != 1 || slices.Equal(now, oldTemplates)) {
		t.Fatalf("templates %v after the reload, %v before: want one new one", now, oldTemplates)
	} else if !preload && len(now) != 0 {
		t.Fatalf("templates %v without --preload", now)
	}
	for _, pid := range n.workerPIDs() {
		if slices.Contains(oldWorkers, pid) {
			t.Fatalf("worker %d served before the reload and still does", pid)
		}
	}
	t.Logf("%d calls during the reload, none failed: %v", total.calls, total.version)
}
