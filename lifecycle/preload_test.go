package lifecycle

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"
)

func preloadPython(t *testing.T) string {
	t.Helper()
	py := os.Getenv("PYFLEET_TEST_PYTHON")
	if py == "" {
		py, _ = filepath.Abs("../python/.venv/bin/python")
	}
	if _, err := os.Stat(py); err != nil {
		t.Fatalf("no Python venv at %s: run `make venv`", py)
	}
	return py
}

// In cgroup mode without PID namespaces (TestPreloadForkIntoPIDNamespace has them) a worker
// forked from the template is in its own start's cgroup, not the
// template's, before the app's code runs; it is this process's child,
// leads its own group, carries its own marks, and is stopped, reaped and
// its cgroup released like a started one.
func TestPreloadForkIntoCgroup(t *testing.T) {
	if err := SetChildSubreaper(); err != nil {
		t.Fatal(err)
	}
	run := Marker{Node: "pre" + strconv.Itoa(os.Getpid()), Run: "r1"}
	cg := mustCgroup(t, run)
	if err := Preloadable(cg); err != nil {
		t.Fatal(err)
	}
	s := mustSpawner(t)
	dir := t.TempDir()
	tm := run
	tm.Worker = "template-1"
	tpl := startTestTemplate(t, s, run, dir, cg, emptyApp)
	wm := run
	wm.Worker = "w1-2"
	p, ready, out, err := forkTestWorker(t, tpl, run, dir, wm.Worker, cg)
	if err != nil {
		t.Fatalf("Fork: %v", err)
	}
	awaitHandshake(t, "worker", p, ready, out)

	pid := p.PID()
	assertOwnChild(t, "worker", pid, wm)
	want := pathIn(cg, filepath.Join(cg.runDir, wm.Worker))
	if got := cgroupOf(t, pid); got != want {
		t.Errorf("worker in cgroup %s, want its start's %s", got, want)
	}
	if got, tplCg := cgroupOf(t, tpl.Process().PID()), pathIn(cg, filepath.Join(cg.runDir, tm.Worker)); got != tplCg {
		t.Errorf("template in cgroup %s, want %s", got, tplCg)
	}

	p.Stop(5 * time.Second)
	if ex := p.Exit(); ex.Code != 0 || ex.Signal != "" {
		t.Errorf("worker stopped with %s, want exit status 0 (SIGTERM honoured)", ex)
	}
	if _, err := os.Stat(filepath.Join(cg.runDir, wm.Worker)); !os.IsNotExist(err) {
		t.Errorf("the worker's cgroup is still there after its reap: %v", err)
	}
	if p.Identity().Alive() {
		t.Errorf("worker %d still alive", pid)
	}
}

// nsApp is a template's app whose workers, on SIGUSR1, report what they
// see of their PID namespace to inside.json in their working directory and
// start a grandchild that leaves every trace of its worker behind: its own
// session, an empty environment (no marks).
const nsApp = `import json, os, signal, subprocess
from pyfleet import App

app = App()


def report(signum, frame):
    child = subprocess.Popen(["/bin/sleep", "3600"], env={}, start_new_session=True)
    with open("/proc/1/cmdline", "rb") as f:
        init = f.read().split(b"\0")
    info = {"pid": os.getpid(), "self": os.readlink("/proc/self"), "ppid": os.getppid(),
            "init": [a.decode() for a in init if a], "child": child.pid}
    with open("inside.json.tmp", "w") as f:
        json.dump(info, f)
    os.rename("inside.json.tmp", "inside.json")


signal.signal(signal.SIGUSR1, report)
`

// A preloaded worker in the PID namespace modes is what a started one is
// there: the node supervises an init, PID 1 of a namespace of the worker's
// own (and in its cgroup), whose child the worker is; the worker sees itself
// as pid 2 and its namespace's /proc; a grandchild that left its session and
// dropped every mark dies when the worker is stopped (the hole markers
// leave and the namespace closes); the worker's own exit status reaches
// the node through the init's status pipe. The template itself runs in
// the node's namespace, without an init.
func TestPreloadForkIntoPIDNamespace(t *testing.T) {
	if err := SetChildSubreaper(); err != nil {
		t.Fatal(err)
	}
	for _, mode := range []string{ModePIDNS, ModeCgroup} {
		t.Run(mode, func(t *testing.T) {
			run := Marker{Node: "pns" + strconv.Itoa(os.Getpid()), Run: uniqueRun(t)}
			var c Containment
			var cg *cgroupContainment
			if mode == ModePIDNS {
				c = mustPIDNS(t)
			} else {
				cg = mustCgroupNS(t, run)
				if cg.ns == nil {
					t.Fatalf("this root host must offer PID namespaces: %v", cg.nsWhy)
				}
				c = cg
			}
			if err := Preloadable(c); err != nil {
				t.Fatal(err)
			}
			s := mustSpawner(t)
			dir := t.TempDir()
			tpl := startTestTemplate(t, s, run, dir, c, nsApp)
			if lv := nsLevels(t, tpl.Process().PID()); lv != 1 {
				t.Errorf("the template has %d NSpid levels, want 1: it lives in the node's namespace", lv)
			}
			wm := run
			wm.Worker = "w1-2"
			p, ready, out, err := forkTestWorker(t, tpl, run, dir, wm.Worker, c)
			if err != nil {
				t.Fatalf("Fork: %v", err)
			}
			members := func() []Identity { return nsMembers(t, p.PID()) }
			var seen []Identity
			t.Cleanup(func() {
				p.Kill()
				killIdentities(seen)
			})
			var hello struct {
				PID int `json:"pid"`
			}
			if line := awaitHandshake(t, "worker", p, ready, out); json.Unmarshal([]byte(line), &hello) != nil {
				t.Fatalf("handshake %q is not JSON", line)
			}
			if hello.PID != 2 {
				t.Errorf("the worker's handshake says pid %d, want 2 (the init's first child)", hello.PID)
			}

			// The node's child is the init, leading its own group, with the
			// worker's marks; in the worker's cgroup.
			init := p.PID()
			assertOwnChild(t, "init", init, wm)
			if nsPID(t, init) != 1 {
				t.Errorf("the init is pid %d in its namespace, want 1", nsPID(t, init))
			}
			worker := 0
			for _, id := range members() {
				if s, err := readStat(id.PID); err == nil && s.ppid == init {
					worker = id.PID
				}
			}
			if worker == 0 {
				t.Fatalf("no child of the init %d in its namespace: %v", init, members())
			}
			if lv, n := nsLevels(t, worker), nsPID(t, worker); lv != 2 || n != 2 {
				t.Errorf("worker %d: %d NSpid levels, pid %d inside; want 2 levels and pid 2", worker, lv, n)
			}
			if k, err := readMarks(worker); err != nil || k.id != wm.IDValue() || k.run != run.RunValue() {
				t.Errorf("the worker's marks %+v (%v), want id %s", k, err, wm.IDValue())
			}
			if cg != nil {
				want := pathIn(cg, filepath.Join(cg.runDir, wm.Worker))
				for _, pid := range []int{init, worker} {
					if got := cgroupOf(t, pid); got != want {
						t.Errorf("pid %d in cgroup %s, want its start's %s", pid, got, want)
					}
				}
			}

			// What the worker sees, and a grandchild that escapes all but
			// the namespace. SIGUSR1 reaches it through its init.
			if err := syscall.Kill(init, syscall.SIGUSR1); err != nil {
				t.Fatal(err)
			}
			var inside struct {
				PID   int      `json:"pid"`
				Self  string   `json:"self"`
				PPID  int      `json:"ppid"`
				Init  []string `json:"init"`
				Child int      `json:"child"`
			}
			waitFor(t, "the worker's report", 30*time.Second, func() bool {
				b, err := os.ReadFile(filepath.Join(dir, "inside.json"))
				return err == nil && json.Unmarshal(b, &inside) == nil
			})
			if inside.PID != 2 || inside.Self != "2" || inside.PPID != 1 {
				t.Errorf("the worker sees getpid %d, /proc/self %q, getppid %d; want 2, 2, 1", inside.PID, inside.Self, inside.PPID)
			}
			if len(inside.Init) < 3 || inside.Init[1] != InitArg || inside.Init[2] != "adopt" {
				t.Errorf("its namespace's /proc/1 runs %q, want the init in adopt mode", inside.Init)
			}
			var child Identity
			for _, id := range members() {
				if nsPID(t, id.PID) == inside.Child {
					child = id
				}
			}
			if child.PID == 0 {
				t.Fatalf("the grandchild (pid %d inside) is not in the namespace: %v", inside.Child, members())
			}
			seen = append(seen, child)
			if k, err := readMarks(child.PID); err != nil || k != (marks{}) {
				t.Fatalf("the grandchild carries marks %+v (%v); it should have none", k, err)
			}
			if cs, err := readStat(child.PID); err != nil || cs.pgrp == worker || cs.pgrp == init {
				t.Fatalf("the grandchild's group %d (%v) is its worker's", cs.pgrp, err)
			}

			p.Stop(10 * time.Second)
			if ex := p.Exit(); ex.Code != 0 || ex.Signal != "" {
				t.Errorf("worker stopped with %s, want exit status 0: the worker's own (the init was SIGKILLed)", ex)
			}
			if child.Alive() {
				t.Errorf("the grandchild %d outlived its worker", child.PID)
			}
			if p.Identity().Alive() {
				t.Errorf("init %d still alive", init)
			}
			if cg != nil {
				if _, err := os.Stat(filepath.Join(cg.runDir, wm.Worker)); !os.IsNotExist(err) {
					t.Errorf("the worker's cgroup is still there after its reap: %v", err)
				}
			}
			if !tpl.Process().Identity().Alive() {
				t.Error("the template died")
			}
		})
	}
}

// nsLevels is how many PID namespaces number pid (NSpid's fields).
func nsLevels(t *testing.T, pid int) int {
	t.Helper()
	return len(nsPIDs(t, pid))
}
