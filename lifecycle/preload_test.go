package lifecycle

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
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

// In cgroup mode (PID namespaces off: those modes do not preload) a worker
// forked from the template is in its own start's cgroup, not the
// template's, before the app's code runs; it is this process's child,
// leads its own group, carries its own marks, and is stopped, reaped and
// its cgroup released like a started one.
func TestPreloadForkIntoCgroup(t *testing.T) {
	py := preloadPython(t)
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
	app := `from pyfleet import App

app = App()
`
	if err := os.WriteFile(filepath.Join(dir, "preapp.py"), []byte(app), 0o644); err != nil {
		t.Fatal(err)
	}

	tm := run
	tm.Worker = "template-1"
	tcmd := exec.Command(py, "-m", "pyfleet.template", "--app", "preapp", "--app-dir", dir)
	tcmd.Dir = dir
	var tout lines
	tpl, err := StartTemplate(s, tcmd, StartOptions{Marker: tm, Contain: cg, Stdout: tout.add, Stderr: tout.add}, time.Minute)
	if err != nil {
		t.Fatalf("StartTemplate: %v (%v)", err, tout.get())
	}
	t.Cleanup(func() { tpl.Stop(0) })

	secretR, secretW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	_, _ = secretW.WriteString("s3cret")
	secretW.Close()
	lifeR, lifeW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer lifeW.Close()
	sock := filepath.Join(dir, "w.sock")
	cmd := exec.Command(py, "-m", "pyfleet.worker", "--app", "preapp", "--app-dir", dir, "--socket", sock, "--worker-id", "w1")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "PYFLEET_WORKER_LIFELINE_FD=3", "PYFLEET_WORKER_SECRET_FD=4")
	cmd.ExtraFiles = []*os.File{lifeR, secretR}
	wm := run
	wm.Worker = "w1-2"
	var out lines
	var readyOnce sync.Once
	ready := make(chan struct{})
	p, err := tpl.Fork(cmd, StartOptions{Marker: wm, Contain: cg, Stdout: func(b []byte) {
		out.add(b)
		if strings.HasPrefix(string(b), "PYFLEET-READY ") {
			readyOnce.Do(func() { close(ready) })
		}
	}, Stderr: out.add})
	lifeR.Close()
	secretR.Close()
	if err != nil {
		t.Fatalf("Fork: %v", err)
	}
	t.Cleanup(p.Kill)
	select {
	case <-ready:
	case <-p.Done():
		t.Fatalf("worker exited before its handshake (%s): %v", p.Exit(), out.get())
	case <-time.After(time.Minute):
		t.Fatalf("no handshake within a minute: %v", out.get())
	}

	pid := p.PID()
	st, err := readStat(pid)
	if err != nil {
		t.Fatal(err)
	}
	if st.ppid != os.Getpid() || st.pgrp != pid {
		t.Errorf("worker %d: parent %d, group %d; want parent %d (this process) and a group of its own", pid, st.ppid, st.pgrp, os.Getpid())
	}
	want := pathIn(cg, filepath.Join(cg.runDir, wm.Worker))
	if got := cgroupOf(t, pid); got != want {
		t.Errorf("worker in cgroup %s, want its start's %s", got, want)
	}
	if got, tplCg := cgroupOf(t, tpl.Process().PID()), pathIn(cg, filepath.Join(cg.runDir, tm.Worker)); got != tplCg {
		t.Errorf("template in cgroup %s, want %s", got, tplCg)
	}
	k, err := readMarks(pid)
	if err != nil || k.id != wm.IDValue() || k.run != run.RunValue() {
		t.Errorf("worker's marks %+v (%v), want id %s", k, err, wm.IDValue())
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
