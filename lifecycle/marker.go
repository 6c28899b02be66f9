package lifecycle

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Environment variables that mark every process of a worker. A child inherits
// its parent's environment, so the marks follow a worker's descendants where
// parent links and process groups do not: through setsid, double forks and
// the death of the node. Only pyfleet sets them, which is what lets a marked
// process be killed as ours.
const (
	EnvWorkerRun   = "PYFLEET_WORKER_RUN"   // <node>/<run>
	EnvWorkerID    = "PYFLEET_WORKER_ID"    // <node>/<run>/<worker>
	EnvWorkerSpawn = "PYFLEET_WORKER_SPAWN" // one start of that worker, unique within the run
)

// Marker names the worker a process belongs to.
type Marker struct {
	Node, Run, Worker string
}

// IsZero reports whether m names nothing.
func (m Marker) IsZero() bool { return m == Marker{} }

// RunValue is the value of EnvWorkerRun.
func (m Marker) RunValue() string { return m.Node + "/" + m.Run }

// IDValue is the value of EnvWorkerID.
func (m Marker) IDValue() string { return m.Node + "/" + m.Run + "/" + m.Worker }

// Env returns the environment entries that mark a worker's processes.
func (m Marker) Env() []string {
	return []string{EnvWorkerRun + "=" + m.RunValue(), EnvWorkerID + "=" + m.IDValue()}
}

// marks are the pyfleet marks found in one process's environment.
type marks struct {
	run, id, spawn string
}

// marker returns the worker the marks name, as far as they name it.
func (k marks) marker() Marker {
	var m Marker
	if node, run, ok := strings.Cut(k.run, "/"); ok {
		m.Node, m.Run = node, run
	}
	if parts := strings.SplitN(k.id, "/", 3); len(parts) == 3 {
		m.Node, m.Run, m.Worker = parts[0], parts[1], parts[2]
	}
	return m
}

// readMarks reads the marks in /proc/<pid>/environ: the environment the
// process was started with. A zombie, a kernel thread or another user's
// process (without privilege) shows none.
func readMarks(pid int) (marks, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/environ")
	if err != nil {
		return marks{}, fmt.Errorf("%w: pid %d: %w", ErrNoProcess, pid, err)
	}
	var k marks
	for kv := range bytes.SplitSeq(b, []byte{0}) {
		key, val, ok := bytes.Cut(kv, []byte{'='})
		if !ok {
			continue
		}
		// A key set twice counts as the kernel passed it last; execve
		// callers (os/exec among them) keep only the last anyway.
		switch string(key) {
		case EnvWorkerRun:
			k.run = string(val)
		case EnvWorkerID:
			k.id = string(val)
		case EnvWorkerSpawn:
			k.spawn = string(val)
		}
	}
	return k, nil
}

// markedProcess is a live process that carries pyfleet marks.
type markedProcess struct {
	pid   int
	marks marks
}

// scanMarked returns every live process other than this one that carries a
// pyfleet mark.
func scanMarked() ([]markedProcess, error) {
	pids, err := listPids()
	if err != nil {
		return nil, err
	}
	self := os.Getpid()
	var out []markedProcess
	for _, pid := range pids {
		if pid == self {
			continue
		}
		k, err := readMarks(pid)
		if err != nil || k == (marks{}) {
			continue
		}
		out = append(out, markedProcess{pid, k})
	}
	return out, nil
}

// killIf kills pid with SIGKILL if, once pinned by a pidfd, it still passes
// check, and waits (up to a second) for it to die. It reports whether it
// sent the signal. Checking after pidfd_open is what makes this safe against
// pid reuse: the pidfd names the process that held the pid when it was
// opened, so a signal through it reaches that process or none, and the check
// reads the /proc entry of that same process unless it has already died, in
// which case the signal fails with ESRCH.
func killIf(pid int, check func(pid int) bool) (bool, error) {
	if pid <= 0 || pid == os.Getpid() {
		return false, nil
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			return false, nil
		}
		return false, fmt.Errorf("lifecycle: pidfd_open %d: %w", pid, err)
	}
	defer unix.Close(fd)
	if !check(pid) {
		return false, nil
	}
	if err := unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0); err != nil {
		if errors.Is(err, unix.ESRCH) {
			return false, nil
		}
		return false, fmt.Errorf("lifecycle: kill %d: %w", pid, err)
	}
	waitPidfd(fd, time.Second)
	return true, nil
}

// waitPidfd waits up to limit for the process behind a pidfd to exit; the
// pidfd turns readable when it does.
func waitPidfd(fd int, limit time.Duration) {
	deadline := time.Now().Add(limit)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return
		}
		n, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, int(left.Milliseconds())+1)
		if err != unix.EINTR || n > 0 {
			return
		}
	}
}

// killMarked kills every live process whose marks pass match, repeating the
// scan until one finds nothing (at most a few times): a process forked by a
// marked parent just before the parent was killed is missed by the scan that
// killed the parent, but not by the next. Each kill is reported through
// events with the given detail.
func killMarked(match func(pid int, k marks) bool, detail string, events Events) (int, error) {
	killed := 0
	for range 5 {
		procs, err := scanMarked()
		if err != nil {
			return killed, err
		}
		n := 0
		var errs []error
		for _, mp := range procs {
			if !match(mp.pid, mp.marks) {
				continue
			}
			ok, err := killIf(mp.pid, func(pid int) bool {
				k, err := readMarks(pid)
				return err == nil && match(pid, k)
			})
			if err != nil {
				errs = append(errs, err)
				continue
			}
			if ok {
				n++
				m := mp.marks.marker()
				emit(events, Event{Kind: KindOrphanReaped, Node: m.Node, Run: m.Run, Worker: m.Worker, PID: mp.pid, Detail: detail})
			}
		}
		killed += n
		if n == 0 || len(errs) > 0 {
			return killed, errors.Join(errs...)
		}
	}
	return killed, nil
}

// KillMarked kills every process that carries m's marks: with m.Worker set,
// every process of that worker name, whichever start of it; without it,
// every process of the run. It reaches the descendants that left a worker's
// process group. A node calls it for its own run on the way out, after its
// workers are stopped; a single worker needs no call, since Start's Marker
// option already kills what its start left when it exits (and, unlike this,
// spares a replacement started under the same name). Each kill is reported
// as an orphan_reaped event (events may be nil). It returns how many
// processes it killed.
func KillMarked(m Marker, events Events) (int, error) {
	if m.Node == "" || m.Run == "" {
		return 0, fmt.Errorf("%w: marker %+v names no run", ErrInvalidName, m)
	}
	if m.Worker == "" {
		run := m.RunValue()
		return killMarked(func(_ int, k marks) bool { return k.run == run }, "carried the marker of run "+run, events)
	}
	id := m.IDValue()
	return killMarked(func(_ int, k marks) bool { return k.id == id }, "carried the marker of worker "+id, events)
}

// emit reports ev, stamped with the time, if anyone listens.
func emit(events Events, ev Event) {
	if events == nil {
		return
	}
	if ev.TS.IsZero() {
		ev.TS = time.Now()
	}
	events(ev)
}

// validName reports whether s can be a node, run or worker name: it ends up
// in file names (<node>.<run>.lock) and in '/'-separated marker values.
func validName(s string) bool {
	return s != "" && !strings.ContainsAny(s, "./\x00")
}

func (m Marker) valid() error {
	if !validName(m.Node) || !validName(m.Run) || !validName(m.Worker) {
		return fmt.Errorf("%w: marker %q/%q/%q", ErrInvalidName, m.Node, m.Run, m.Worker)
	}
	return nil
}
