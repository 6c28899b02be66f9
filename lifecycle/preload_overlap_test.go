package lifecycle

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// startTestTemplate starts a template of an empty app in containment c
// (nil: group), stopped at the test's end.
// emptyApp is the app the templates of these tests preload unless a test
// needs functions.
const emptyApp = "from pyfleet import App\n\napp = App()\n"

// startTestTemplate starts a template in containment c that preloads
// app, the source of preapp.py in dir.
func startTestTemplate(t *testing.T, s *Spawner, run Marker, dir string, c Containment, app string) *Template {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, "preapp.py"), []byte(app), 0o644); err != nil {
		t.Fatal(err)
	}
	tm := run
	tm.Worker = "template-1"
	tcmd := exec.Command(preloadPython(t), "-m", "pyfleet.template", "--app", "preapp", "--app-dir", dir,
		"--argv-room", strings.Repeat("-", 512))
	tcmd.Dir = dir
	var tout lines
	tpl, err := StartTemplate(s, tcmd, StartOptions{Marker: tm, Contain: c, Stdout: tout.add, Stderr: tout.add}, time.Minute)
	if err != nil {
		t.Fatalf("StartTemplate: %v (%v)", err, tout.get())
	}
	t.Cleanup(func() { tpl.Stop(0) })
	return tpl
}

// forkTestWorker forks worker name from tpl in containment c; ready gets
// its handshake line, what follows "PYFLEET-READY ".
func forkTestWorker(t *testing.T, tpl *Template, run Marker, dir, name string, c Containment) (*Process, <-chan string, *lines, error) {
	secretR, secretW, err := os.Pipe()
	if err != nil {
		return nil, nil, nil, err
	}
	_, _ = secretW.WriteString("s3cret")
	secretW.Close()
	lifeR, lifeW, err := os.Pipe()
	if err != nil {
		return nil, nil, nil, err
	}
	t.Cleanup(func() { lifeW.Close() })
	cmd := exec.Command(preloadPython(t), "-m", "pyfleet.worker", "--app", "preapp", "--app-dir", dir,
		"--socket", filepath.Join(dir, name+".sock"), "--worker-id", name)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "PYFLEET_WORKER_LIFELINE_FD=3", "PYFLEET_WORKER_SECRET_FD=4")
	cmd.ExtraFiles = []*os.File{lifeR, secretR}
	wm := run
	wm.Worker = name
	out := &lines{}
	ready := make(chan string, 1)
	p, err := tpl.Fork(cmd, StartOptions{Marker: wm, Contain: c, Stdout: func(b []byte) {
		out.add(b)
		if rest, ok := strings.CutPrefix(string(b), "PYFLEET-READY "); ok {
			select {
			case ready <- rest:
			default:
			}
		}
	}, Stderr: out.add})
	lifeR.Close()
	secretR.Close()
	if err == nil {
		t.Cleanup(p.Kill)
	}
	return p, ready, out, err
}

// awaitHandshake returns what follows "PYFLEET-READY " in the handshake
// of what (a forked worker), or fails the test if it exits or stays
// silent for a minute.
func awaitHandshake(t *testing.T, what string, p *Process, ready <-chan string, out *lines) string {
	t.Helper()
	select {
	case line := <-ready:
		return line
	case <-p.Done():
		t.Fatalf("%s exited before its handshake (%s): %v", what, p.Exit(), out.get())
	case <-time.After(time.Minute):
		t.Fatalf("%s: no handshake within a minute: %v", what, out.get())
	}
	return ""
}

// assertOwnChild checks that pid (what) is this process's child, leads a
// group of its own and carries m's marks: what a spawned worker (or its
// init) is.
func assertOwnChild(t *testing.T, what string, pid int, m Marker) {
	t.Helper()
	st, err := readStat(pid)
	if err != nil {
		t.Fatal(err)
	}
	if st.ppid != os.Getpid() || st.pgrp != pid {
		t.Errorf("%s (%d): parent %d, group %d; want parent %d (this process) and a group of its own", what, pid, st.ppid, st.pgrp, os.Getpid())
	}
	if k, err := readMarks(pid); err != nil || k.id != m.IDValue() || k.run != m.RunValue() {
		t.Errorf("%s's marks %+v (%v), want id %s, run %s", what, k, err, m.IDValue(), m.RunValue())
	}
}

// More workers than maxForksInFlight asked for at once: the dialogues
// overlap (python/pyfleet/template.py's Forker), each answer reaches its
// own Fork, and every worker is this process's child, in a group of its
// own, with its own marks.
func TestPreloadForksOverlap(t *testing.T) {
	if err := SetChildSubreaper(); err != nil {
		t.Fatal(err)
	}
	run := Marker{Node: "ovl" + strconv.Itoa(os.Getpid()), Run: "r1"}
	s := mustSpawner(t)
	dir := t.TempDir()
	tpl := startTestTemplate(t, s, run, dir, nil, emptyApp)

	const n = 2*maxForksInFlight + 1
	type forked struct {
		p     *Process
		ready <-chan string
		out   *lines
		err   error
	}
	got := make([]forked, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			p, ready, out, err := forkTestWorker(t, tpl, run, dir, fmt.Sprintf("w%d", i+1), nil)
			got[i] = forked{p, ready, out, err}
		})
	}
	wg.Wait()
	pids := map[int]bool{}
	for i, f := range got {
		if f.err != nil {
			t.Fatalf("Fork w%d: %v", i+1, f.err)
		}
		wm := run
		wm.Worker = fmt.Sprintf("w%d", i+1)
		awaitHandshake(t, wm.Worker, f.p, f.ready, f.out)
		pid := f.p.PID()
		if pids[pid] {
			t.Fatalf("pid %d forked twice", pid)
		}
		pids[pid] = true
		assertOwnChild(t, wm.Worker, pid, wm)
	}
	for _, f := range got {
		f.p.Stop(5 * time.Second)
		if ex := f.p.Exit(); ex.Code != 0 || ex.Signal != "" {
			t.Errorf("worker %d stopped with %s, want exit status 0", f.p.PID(), ex)
		}
	}
}

// A template that died fails every Fork asked of it after with
// ErrTemplateGone, at once: the pool then starts plainly.
func TestPreloadForkAfterTemplateDied(t *testing.T) {
	if err := SetChildSubreaper(); err != nil {
		t.Fatal(err)
	}
	run := Marker{Node: "die" + strconv.Itoa(os.Getpid()), Run: "r1"}
	s := mustSpawner(t)
	dir := t.TempDir()
	tpl := startTestTemplate(t, s, run, dir, nil, emptyApp)
	if err := syscall.Kill(tpl.Process().PID(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-tpl.Process().Done()
	errs := make([]error, 3)
	var wg sync.WaitGroup
	for i := range errs {
		wg.Go(func() {
			p, _, _, err := forkTestWorker(t, tpl, run, dir, fmt.Sprintf("w%d", i+1), nil)
			if p != nil {
				p.Kill()
			}
			errs[i] = err
		})
	}
	wg.Wait()
	for i, err := range errs {
		if !errors.Is(err, ErrTemplateGone) {
			t.Errorf("Fork w%d after the template died: %v, want ErrTemplateGone", i+1, err)
		}
	}
	if _, err := s.ReapAdopted(nil); err != nil {
		t.Error(err)
	}
}
