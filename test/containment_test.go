package test

// Containment modes (issue 10), proven with real nodes serving
// test/apps/contained.py: user code sees no difference between a mode and
// the group mode (the reference, what every host offers), and in pidns
// mode nothing a worker started survives a kill -9 of the node and its
// guardian together, not even a daemon in a clean environment.

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/internal/testkit"
	"github.com/pyfleet/pyfleet/lifecycle"
)

func containedApp() string { return filepath.Join(repoRoot, "test", "apps", "contained.py") }

// userModes are the modes the user-view test runs in: the group mode as the
// reference, and every mode of kernel containment this branch has.
var userModes = []string{lifecycle.ModeGroup, lifecycle.ModePIDNS, lifecycle.ModeCgroup}

// isInit reports whether pid runs a worker's init (pyfleet-init, or
// poolnode re-executed, with InitArg).
func isInit(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return false
	}
	args := strings.Split(string(b), "\x00")
	return len(args) > 1 && args[1] == lifecycle.InitArg
}

// isPythonWorker reports whether pid runs pyfleet's worker: an init's
// other children are orphans of its namespace that it adopted.
func isPythonWorker(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	return err == nil && strings.Contains(string(b), "\x00-m\x00pyfleet.worker\x00")
}

// pythonPIDs returns the host pids of the node's Python workers: the
// processes the node supervises, or in pidns mode their inits' children.
func (n *nodeProc) pythonPIDs(t *testing.T) []int {
	t.Helper()
	var out []int
	for _, pid := range n.workerPIDs() {
		if !isInit(pid) {
			out = append(out, pid)
			continue
		}
		entries, _ := os.ReadDir("/proc")
		for _, e := range entries {
			child, err := strconv.Atoi(e.Name())
			if err != nil {
				continue
			}
			if pi, err := readProcInfo(child); err == nil && pi.ppid == pid && isPythonWorker(child) {
				out = append(out, child)
			}
		}
	}
	slices.Sort(out)
	return out
}

// nsPIDs is nsPIDsOf, failing the test if pid is gone.
func nsPIDs(t *testing.T, pid int) []int {
	t.Helper()
	ids := nsPIDsOf(pid)
	if ids == nil {
		t.Fatalf("no NSpid in /proc/%d/status", pid)
	}
	return ids
}

// namespaceMembers returns every live process in the PID namespace of
// init (a host pid), init included.
func namespaceMembers(init int) []lifecycle.Identity {
	ns, err := os.Readlink("/proc/" + strconv.Itoa(init) + "/ns/pid")
	if err != nil {
		return nil
	}
	var out []lifecycle.Identity
	for _, pid := range pidsInNamespace(ns) {
		if id, err := lifecycle.ReadIdentity(pid); err == nil && id.Alive() {
			out = append(out, id)
		}
	}
	return out
}

// readRSSBytes reads a process's resident memory from the host's /proc.
func readRSSBytes(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/statm")
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b))
	pages, _ := strconv.ParseInt(f[1], 10, 64)
	return pages * int64(os.Getpagesize())
}

func TestContainmentUserCodeSeesNoDifference(t *testing.T) {
	for _, mode := range userModes {
		t.Run(mode, func(t *testing.T) {
			if mode == lifecycle.ModeCgroup {
				requireCgroup(t)
			}
			n := startNode(t, nodeOptions{app: containedApp(), workers: 1, extra: []string{"--containment", mode}})
			checkUserView(t, n, mode, os.Getuid())
		})
	}
	// --preload in every mode: a worker forked from the template sees
	// what a started one sees (in the PID namespace modes, under an init
	// that adopted it).
	for _, mode := range userModes {
		t.Run(mode+"-preloaded", func(t *testing.T) {
			if mode == lifecycle.ModeCgroup {
				requireCgroup(t)
			}
			n := startNode(t, nodeOptions{app: containedApp(), workers: 1, preload: true, extra: []string{"--containment", mode}})
			checkUserView(t, n, mode, os.Getuid())
		})
	}
}

// TestContainmentPIDNSAsOtherUser: without root, the init needs a user
// namespace of its own (mapping the node's uid and gid to themselves) to
// mount the namespace's /proc. The same checks, with a node run by a
// throwaway user, with workers started and forked from a template (whose
// intermediate makes the user namespace, python/pyfleet/template.py).
func TestContainmentPIDNSAsOtherUser(t *testing.T) {
	inBothModes(t, func(t *testing.T, preload bool) {
		o := asOtherUser(t, nodeOptions{app: containedApp(), workers: 1, preload: preload, extra: []string{"--containment", lifecycle.ModePIDNS}})
		n := startNode(t, o)
		// The user namespace gave the init (and, before it, the forking
		// intermediate) every capability in it; the worker keeps none.
		for _, py := range n.pythonPIDs(t) {
			b, err := os.ReadFile("/proc/" + strconv.Itoa(py) + "/status")
			if err != nil {
				t.Fatal(err)
			}
			for line := range strings.SplitSeq(string(b), "\n") {
				if k, v, ok := strings.Cut(line, ":"); ok && strings.HasPrefix(k, "Cap") && k != "CapBnd" {
					if v = strings.TrimSpace(v); strings.Trim(v, "0") != "" {
						t.Errorf("worker %d has %s %s, want none", py, k, v)
					}
				}
			}
		}
		checkUserView(t, n, lifecycle.ModePIDNS, int(o.cred.Uid))
	})
}

// checkUserView runs one check per item of issue 10's "user code sees no
// difference" against a node with one worker.
func checkUserView(t *testing.T, n *nodeProc, mode string, uid int) {
	nc := n.connect()
	pys := n.pythonPIDs(t)
	if len(pys) != 1 {
		t.Fatalf("the node's Python workers: %v, want one", pys)
	}
	py := pys[0]
	// pidns mode runs each worker under an init; so does cgroup mode where
	// the host allows PID namespaces, which this machine must.
	namespaced := mode != lifecycle.ModeGroup
	if supervised := n.workerPIDs(); namespaced && (len(supervised) != 1 || !isInit(supervised[0])) {
		t.Fatalf("%s: the node supervises %v, want the worker's init", mode, supervised)
	}

	var who struct {
		PID       int      `json:"pid"`
		Self      int      `json:"self"`
		StatusPID int      `json:"status_pid"`
		StatPID   int      `json:"stat_pid"`
		PsutilPID int      `json:"psutil_pid"`
		Pgrp      int      `json:"pgrp"`
		UID       int      `json:"uid"`
		Cmdline   []string `json:"cmdline"`
	}
	t.Run("getpid and /proc/self agree", func(t *testing.T) {
		callOK(t, nc, fnSubject("whoami"), `{}`, &who)
		if who.Self != who.PID || who.StatusPID != who.PID || who.StatPID != who.PID || who.PsutilPID != who.PID {
			t.Errorf("os.getpid() %d, /proc/self %d, /proc/self/status %d, /proc/self/stat %d, psutil %d: want all equal",
				who.PID, who.Self, who.StatusPID, who.StatPID, who.PsutilPID)
		}
		if who.Pgrp != who.PID {
			t.Errorf("os.getpgrp() = %d, want the worker's own group %d", who.Pgrp, who.PID)
		}
		if who.UID != uid {
			t.Errorf("os.getuid() = %d, want the node's %d", who.UID, uid)
		}
		// psutil read the worker's own command line, not its init's.
		if len(who.Cmdline) < 3 || who.Cmdline[1] != "-m" || who.Cmdline[2] != "pyfleet.worker" {
			t.Errorf("psutil.Process(os.getpid()).cmdline() = %q", who.Cmdline)
		}
		// The host numbers the same process differently in pidns mode,
		// and the innermost number is the one the worker sees.
		ns := nsPIDs(t, py)
		if ns[len(ns)-1] != who.PID {
			t.Errorf("host pid %d has NSpid %v; the worker says %d", py, ns, who.PID)
		}
		if want := map[bool]int{false: 1, true: 2}[namespaced]; len(ns) != want {
			t.Errorf("%s: NSpid %v, want %d levels", mode, ns, want)
		}
	})

	t.Run("psutil memory is the worker's own", func(t *testing.T) {
		var mem struct{ Before, After, VmRSS int64 }
		callOK(t, nc, fnSubject("memory"), `{"mb":64}`, &mem)
		if grown := mem.After - mem.Before; grown < 60<<20 {
			t.Errorf("psutil RSS grew by %d bytes over a 64 MB allocation (%d -> %d)", grown, mem.Before, mem.After)
		}
		if d := mem.After - mem.VmRSS; d < -4<<20 || d > 4<<20 {
			t.Errorf("psutil RSS %d, /proc/self/status VmRSS %d", mem.After, mem.VmRSS)
		}
		// The host's view of the very process agrees (the memory is held).
		if host := readRSSBytes(t, py); host < mem.After*8/10 || host > mem.After*12/10 {
			t.Errorf("the host reads RSS %d for pid %d; psutil inside said %d", host, py, mem.After)
		}
	})

	for _, method := range []string{"fork", "spawn"} {
		t.Run("multiprocessing "+method, func(t *testing.T) {
			var out struct {
				Squares  []int `json:"squares"`
				Parents  []int `json:"parents"`
				Children []int `json:"children"`
				PID      int   `json:"pid"`
			}
			callOK(t, nc, fnSubject("mp"), `{"method":"`+method+`"}`, &out)
			if !slices.Equal(out.Squares, []int{1, 4, 9, 16, 25}) {
				t.Errorf("squares %v", out.Squares)
			}
			if !slices.Equal(out.Parents, []int{out.PID}) || len(out.Children) == 0 || slices.Contains(out.Children, out.PID) {
				t.Errorf("pool processes %v with parents %v; the worker is %d", out.Children, out.Parents, out.PID)
			}
		})
	}

	t.Run("subprocess exit codes", func(t *testing.T) {
		// In pidns mode the init reaps with wait4(-1) while the orphans of
		// each `sh` die around these calls: it must take none of these.
		var out struct {
			Codes   []int `json:"codes"`
			Waitpid int   `json:"waitpid"`
		}
		callOK(t, nc, fnSubject("exit_codes"), `{"n":30}`, &out)
		if len(out.Codes) != 30 || slices.ContainsFunc(out.Codes, func(c int) bool { return c != 7 }) {
			t.Errorf("subprocess.run(exit 7) return codes %v", out.Codes)
		}
		if out.Waitpid != 9 {
			t.Errorf("os.waitpid of an `exit 9` child: %d", out.Waitpid)
		}
	})

	t.Run("os.kill of the worker's own child", func(t *testing.T) {
		var out struct {
			ReturnCode int `json:"returncode"`
		}
		callOK(t, nc, fnSubject("kill_child"), `{}`, &out)
		if out.ReturnCode != -int(syscall.SIGTERM) {
			t.Errorf("a child killed with SIGTERM returned %d", out.ReturnCode)
		}
	})

	// Last: it replaces the worker.
	t.Run("SIGTERM to the worker stops it gracefully", func(t *testing.T) {
		ev := watchEvents(t, nc, "default")
		supervised := n.workerPIDs()
		if len(supervised) != 1 {
			t.Fatalf("the node supervises %v", supervised)
		}
		touch := filepath.Join(shortTempDir(t), "running")
		if err := os.Chmod(filepath.Dir(touch), 0o777); err != nil { // the worker may run as another user
			t.Fatal(err)
		}
		answer := make(chan *nats.Msg, 1)
		go func() {
			m, err := request(nc, fnSubject("slow"), `{"ms":1000,"touch":"`+touch+`"}`, 30*time.Second)
			if err != nil {
				t.Errorf("slow: %v", err)
			}
			answer <- m
		}()
		deadline := time.Now().Add(30 * time.Second)
		for {
			if _, err := os.Stat(touch); err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("the slow call did not start")
			}
			time.Sleep(10 * time.Millisecond)
		}
		// What an operator would do: the pid the node reports.
		if err := syscall.Kill(supervised[0], syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		// The call in flight finishes.
		if m := <-answer; m == nil || m.Header.Get("Pyfleet-Status") != "ok" {
			t.Errorf("the call in flight: %v", m)
		}
		// The worker exits 0 on its own, which the node counts as a crash
		// and replaces.
		crashed := ev.waitFor(30*time.Second, allOf(kind(lifecycle.KindCrashed), withPID(supervised[0])))
		if crashed.Signal != "" || crashed.ExitCode == nil || *crashed.ExitCode != 0 {
			code := "none"
			if crashed.ExitCode != nil {
				code = strconv.Itoa(*crashed.ExitCode)
			}
			t.Errorf("crashed with signal %q, exit code %s; want exit code 0", crashed.Signal, code)
		}
		ev.waitFor(30*time.Second, func(e lifecycle.Event) bool { return e.Kind == lifecycle.KindReady && e.PID != supervised[0] })
		callOK(t, nc, fnSubject("whoami"), `{}`, nil)
	})
}

// asOtherUser returns o set to run the node as a throwaway user: a copy of
// the poolnode binary and its init it can execute, a state dir it owns, and an
// interpreter it can run with the venv's packages (the venv's own python
// may be a link into root's home, which that user cannot enter: then the
// system's python of the same version with the venv's site-packages on
// PYTHONPATH). It skips the test, saying why, if no interpreter works.
func asOtherUser(t *testing.T, o nodeOptions) nodeOptions {
	t.Helper()
	uid, gid := testkit.OtherUser(t)
	cred := &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	dir, err := os.MkdirTemp("", "pyfleet-user-bin-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	// The init beside poolnode, as installed: the other user runs both.
	for _, bin := range []string{poolnodeBin, filepath.Join(binDir, lifecycle.InitBinaryName)} {
		data, err := os.ReadFile(bin)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, filepath.Base(bin)), data, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	o.bin = filepath.Join(dir, "poolnode")
	o.stateDir = shortTempDir(t)
	if err := os.Chown(o.stateDir, uid, gid); err != nil {
		t.Fatal(err)
	}

	works := func(py string, env []string) error {
		cmd := exec.Command(py, "-c", "import pyfleet.worker, psutil")
		cmd.Env = append(os.Environ(), env...)
		cmd.Dir = "/"
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("%s: %v: %s", py, err, out)
		}
		return nil
	}
	err = works(python, nil)
	if err == nil {
		o.extra = append(slices.Clip(o.extra), "--python", python)
	} else {
		// The venv's own python's version, and its site-packages.
		out, verr := exec.Command(python, "-c", "import sys, sysconfig; print('%d.%d' % sys.version_info[:2]); print(sysconfig.get_path('purelib'))").Output()
		lines := strings.Fields(string(out))
		if verr != nil || len(lines) != 2 {
			t.Skipf("the venv's python cannot be run as uid %d (%v), nor asked for its version (%v)", uid, err, verr)
		}
		env := []string{"PYTHONPATH=" + lines[1] + ":" + filepath.Join(repoRoot, "python")}
		sys := "/usr/bin/python" + lines[0]
		if err2 := works(sys, env); err2 != nil {
			t.Skipf("no interpreter with pyfleet that uid %d can run: %v; %v", uid, err, err2)
		}
		t.Logf("uid %d cannot run the venv's python (%v): using %s with %s", uid, err, sys, env[0])
		o.extra = append(slices.Clip(o.extra), "--python", sys)
		o.env = append(slices.Clip(o.env), env...)
	}
	o.cred = cred
	return o
}

// TestContainmentPIDNSKillNineNodeAndGuardian is the orphan row of issue 10
// that only kernel containment can cover: the node and its guardian
// SIGKILLed at the same moment, while the workers have started children
// and daemons in a clean environment (no marker). Each worker's init dies
// of its parent-death signal, and the kernel kills its namespace. 0
// processes are left 1 s after, and nothing else is killed.
func TestContainmentPIDNSKillNineNodeAndGuardian(t *testing.T) {
	run := func(t *testing.T, o nodeOptions) {
		n := startNode(t, o)
		nc := n.connect()
		for range 3 {
			var d, c spawnReply
			callOK(t, nc, fnSubject("helper_daemon"), `{}`, &d)
			callOK(t, nc, fnSubject("clean_child"), `{}`, &c)
		}
		inits := n.workerPIDs()
		if len(inits) != 2 {
			t.Fatalf("the node supervises %v, want two inits", inits)
		}
		var ids []lifecycle.Identity
		for _, init := range inits {
			if !isInit(init) {
				t.Fatalf("pid %d is not an init", init)
			}
			ids = append(ids, namespaceMembers(init)...)
		}
		// 2 inits, 2 workers, 3 daemons and 3 children.
		if len(ids) != 10 {
			t.Fatalf("the namespaces hold %d processes, want 10: %v", len(ids), ids)
		}
		bystanders := startBystanders(t)
		at := n.killNineWithHelpers(t)
		_, left := waitGone(ids, time.Second)
		gone := time.Since(at)
		if len(left) > 0 {
			killIdentities(left)
			t.Fatalf("%d of %d processes still running 1 s after kill -9 of the node and its guardian: %v", len(left), len(ids), left)
		}
		t.Logf("all %d processes (inits, workers, clean-environment children and setsid daemons) gone %v after kill -9 of the node and its guardian", len(ids), gone.Round(time.Millisecond))
		bystanders.assertAlive(t)
		n.wait(10 * time.Second)
	}
	o := nodeOptions{app: containedApp(), workers: 2, extra: []string{"--containment", lifecycle.ModePIDNS}}
	t.Run("root", func(t *testing.T) { run(t, o) })
	t.Run("other user", func(t *testing.T) { run(t, asOtherUser(t, o)) })
}
