package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// proc is one process the harness started. Every proc leads its own process
// group and gets SIGKILL if the harness dies (Pdeathsig: the harness never
// locks a goroutine to a thread, so the forking thread lives as long as it).
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string        // its stderr (and stdout, unless read) go here
	done chan struct{} // closed once reaped
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

// exited reports whether the process has been reaped.
func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// kill sends SIGKILL to the process's group and waits for it to be reaped.
func (p *proc) kill() {
	_ = syscall.Kill(-p.pid(), syscall.SIGKILL)
	<-p.done
}

// stop sends SIGTERM and waits up to grace for the process to exit, then
// kills its group.
func (p *proc) stop(grace time.Duration) {
	if p.exited() {
		return
	}
	_ = syscall.Kill(p.pid(), syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
		p.kill()
	}
}

// tail is the end of the process's log, for error messages.
func (p *proc) tail() string {
	b, err := os.ReadFile(p.log)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 12 {
		lines = lines[len(lines)-12:]
	}
	return strings.Join(lines, "\n")
}

// procs tracks every process the harness started, so that cleanup can
// kill whatever is left however the harness ends.
type procs struct {
	mu   sync.Mutex
	list []*proc
	dir  string // logs
	seq  int
}

// start starts cmd in a process group of its own. If stdout is non-nil it
// gets each line of the process's stdout; otherwise stdout goes to the log.
func (ps *procs) start(name string, cmd *exec.Cmd, stdout func(line string)) (*proc, error) {
	ps.mu.Lock()
	ps.seq++
	logPath := filepath.Join(ps.dir, fmt.Sprintf("%03d-%s.log", ps.seq, name))
	ps.mu.Unlock()
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd.Stderr = logf
	cmd.Stdout = logf
	var r, w *os.File
	if stdout != nil {
		if r, w, err = os.Pipe(); err != nil {
			return nil, err
		}
		cmd.Stdout = w
	}
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid = true
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	if err := cmd.Start(); err != nil {
		if r != nil {
			r.Close()
			w.Close()
		}
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	ps.mu.Lock()
	ps.list = append(ps.list, p)
	ps.mu.Unlock()
	if r != nil {
		w.Close()
		go func() {
			defer r.Close()
			sc := bufio.NewScanner(r)
			sc.Buffer(make([]byte, 64<<10), 1<<20)
			for sc.Scan() {
				stdout(sc.Text())
			}
			_, _ = io.Copy(io.Discard, r)
		}()
	}
	go func() {
		_ = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// killAll kills every process still running and waits for each.
func (ps *procs) killAll() {
	ps.mu.Lock()
	list := append([]*proc(nil), ps.list...)
	ps.mu.Unlock()
	var wg sync.WaitGroup
	for _, p := range list {
		if !p.exited() {
			wg.Go(p.kill)
		}
	}
	wg.Wait()
}

// childEnv is the harness's environment without any PYFLEET_ variable: a
// poolnode reads its flags from PYFLEET_<FLAG>.
func childEnv(extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "PYFLEET_") {
			env = append(env, kv)
		}
	}
	return append(env, extra...)
}

// markedPIDs lists live processes whose environment holds one of the
// PYFLEET_WORKER_RUN values that start with prefix (zombies count as gone).
func markedPIDs(prefix string) []int {
	needle := []byte("\x00PYFLEET_WORKER_RUN=" + prefix)
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		env, err := os.ReadFile("/proc/" + e.Name() + "/environ")
		if err != nil || len(env) == 0 {
			continue // gone, a zombie, or not ours to read
		}
		if bytes.Contains(append([]byte{0}, env...), needle) {
			if st := procState(pid); st != "" && st != "Z" && st != "X" {
				out = append(out, pid)
			}
		}
	}
	return out
}

// procState is the state letter of /proc/<pid>/stat, "" if it is gone.
func procState(pid int) string {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return ""
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return ""
	}
	return string(b[i+2])
}

// cpuTime is the user+system CPU time of pid (all its threads).
func cpuTime(pid int) (time.Duration, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("bad stat")
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, errors.New("short stat")
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	const clkTck = 100 // USER_HZ on Linux
	return time.Duration(ut+st) * time.Second / clkTck, nil
}

// childrenOf lists the pids whose parent is pid.
func childrenOf(pid int) []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		c, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(b[i+1:]))
		if len(f) > 1 && f[1] == strconv.Itoa(pid) {
			out = append(out, c)
		}
	}
	return out
}

// rssKB is VmRSS of pid in kB.
func rssKB(pid int) (int, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(rest)
			if len(f) > 0 {
				return strconv.Atoi(f[0])
			}
		}
	}
	return 0, errors.New("no VmRSS")
}

// procInfo is one process as /proc/<pid>/stat shows it. A pid and its start
// time name one process: a pid reused later has another start time.
type procInfo struct {
	pid, ppid int
	state     string
	start     string // field 22, clock ticks since boot
}

func readProcInfo(pid int) (procInfo, bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return procInfo{}, false
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procInfo{}, false
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return procInfo{}, false
	}
	ppid, _ := strconv.Atoi(f[1])
	return procInfo{pid: pid, ppid: ppid, state: f[0], start: f[19]}, true
}

// alive reports whether the process p named still runs: its pid has the
// same start time and is not a zombie.
func (p procInfo) alive() bool {
	now, ok := readProcInfo(p.pid)
	return ok && now.start == p.start && now.state != "Z" && now.state != "X"
}

func allProcs() []procInfo {
	ents, _ := os.ReadDir("/proc")
	var out []procInfo
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if p, ok := readProcInfo(pid); ok {
			out = append(out, p)
		}
	}
	return out
}

// tree is root and every live descendant of it, as they are now.
func tree(root int) []procInfo {
	all := allProcs()
	kids := map[int][]procInfo{}
	var out []procInfo
	for _, p := range all {
		kids[p.ppid] = append(kids[p.ppid], p)
		if p.pid == root {
			out = append(out, p)
		}
	}
	for i := 0; i < len(out); i++ {
		out = append(out, kids[out[i].pid]...)
	}
	return slices.DeleteFunc(out, func(p procInfo) bool { return p.state == "Z" || p.state == "X" })
}

// taggedProcs lists the live processes whose argv[0] starts with prefix:
// the clean-environment children of test/bench/benchapp.py, which carry no
// marker.
func taggedProcs(prefix string) []procInfo {
	var out []procInfo
	for _, p := range allProcs() {
		if p.state == "Z" || p.state == "X" {
			continue
		}
		b, err := os.ReadFile("/proc/" + strconv.Itoa(p.pid) + "/cmdline")
		if err != nil {
			continue
		}
		if arg0, _, _ := bytes.Cut(b, []byte{0}); strings.HasPrefix(string(arg0), prefix) {
			out = append(out, p)
		}
	}
	return out
}

// killProcs sends SIGKILL to each process still alive and waits up to limit
// for all of them to be gone; it returns those still alive.
func killProcs(ps []procInfo, limit time.Duration) []procInfo {
	for _, p := range ps {
		if p.alive() {
			_ = syscall.Kill(p.pid, syscall.SIGKILL)
		}
	}
	end := time.Now().Add(limit)
	for {
		left := slices.DeleteFunc(slices.Clone(ps), func(p procInfo) bool { return !p.alive() })
		if len(left) == 0 || time.Now().After(end) {
			return left
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// schedCPU is the CPU time of pid's live threads (/proc/<pid>/task/*/schedstat,
// in ns, unlike /proc/<pid>/stat's 10 ms ticks, which would round a
// process that used 5 ms down to nothing).
func schedCPU(pid int) time.Duration {
	dir := "/proc/" + strconv.Itoa(pid) + "/task"
	ents, _ := os.ReadDir(dir)
	var sum time.Duration
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name(), "schedstat"))
		if err != nil {
			continue
		}
		if f := strings.Fields(string(b)); len(f) > 0 {
			ns, _ := strconv.ParseInt(f[0], 10, 64)
			sum += time.Duration(ns)
		}
	}
	return sum
}
