package lifecycle

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// GuardianArg, as the first argument, turns the node's own binary into its
// guardian (see StartGuardian); the binary's main must hand over to
// GuardianMain when it sees it.
const GuardianArg = "__pyfleet_guardian"

// Guardian is a small process that outlives its node for one reason: to kill
// every process of the node's run if the node dies without doing it itself
// (SIGKILL, OOM, a crash). The workers' parent-death signals end the workers
// but not what they started with subprocess (fork and exec skip the
// runtime's at-fork hooks), and a worker's own lifeline loses the race
// against its SIGKILL; the guardian is a separate process with nothing to
// lose, so it acts on the node's death within milliseconds. What it misses
// (the guardian itself killed too) the reaper finds when a node next starts
// on the state dir.
//
// On the node's death it kills, in this order: the run's cgroup (in
// ModeCgroup: everything any worker started, however it hid), the process
// group of every worker still running (what a worker started in its own
// group, even with a clean environment), and every process that carries
// the run's marker (what left a group: setsid, double forks).
type Guardian struct {
	cmd  *exec.Cmd
	mu   sync.Mutex // one line at a time
	w    *os.File   // the node's end: group lines (see groupStarted), and its close is the message
	done chan struct{}
}

// StartGuardian starts the guardian of run m (m.Worker empty): a copy of the
// running binary that reads its stdin until EOF. The node holds the only
// write end, so EOF comes when the node stops it or dies, however it dies.
// The guardian stays in the node's process group (so the node's subreaper
// does not take it for an orphan) and ignores the terminal's signals.
// With a ModeCgroup containment c, the guardian also kills and removes the
// run's cgroup when the node is gone (c may be nil).
func StartGuardian(m Marker, stateDir string, c Containment) (*Guardian, error) {
	if m.Worker != "" || !validName(m.Node) || !validName(m.Run) {
		return nil, fmt.Errorf("%w: a guardian keeps a whole run, not %+v", ErrInvalidName, m)
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("lifecycle: guardian: %w", err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("lifecycle: guardian: %w", err)
	}
	ready, readyW, err := os.Pipe()
	if err != nil {
		r.Close()
		w.Close()
		return nil, fmt.Errorf("lifecycle: guardian: %w", err)
	}
	defer ready.Close()
	cmd := exec.Command(exe, GuardianArg, m.Node, m.Run, journalPath(stateDir, m))
	if cg, ok := c.(*cgroupContainment); ok {
		cmd.Args = append(cmd.Args, cg.runDir)
	}
	cmd.Stdin = r
	cmd.Stdout = readyW
	cmd.Stderr = os.Stderr
	// A node started from inside a worker must not make a guardian that
	// carries (and so would kill) that worker's marks.
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "PYFLEET_WORKER_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	err = cmd.Start()
	r.Close()
	readyW.Close()
	if err != nil {
		w.Close()
		return nil, fmt.Errorf("lifecycle: guardian: %w", err)
	}
	g := &Guardian{cmd: cmd, w: w, done: make(chan struct{})}
	go func() {
		defer close(g.done)
		_ = cmd.Wait()
	}()
	// Until it has set its signals aside, a Ctrl-C would end the guardian
	// with the node; it says when it has, by closing its stdout.
	_ = ready.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.Copy(io.Discard, ready); err != nil {
		g.Stop()
		return nil, fmt.Errorf("lifecycle: guardian did not start: %w", err)
	}
	return g, nil
}

// The node tells its guardian, one line each, of every worker's process
// group as it starts ("+PGID STARTTIME WORKER": the leader's pid, which is
// the group id, and its start time) and as it ends ("-PGID"), so the list
// stays as short as the pool. A guardian that only ever sees its pipe close
// kills by marker alone.

// groupStarted tells the guardian of a worker's group; g may be nil.
func (g *Guardian) groupStarted(pgid int, leader Identity, worker string) {
	if g == nil {
		return
	}
	if strings.ContainsAny(worker, "\n") {
		worker = ""
	}
	g.tell(fmt.Sprintf("+%d %d %s\n", pgid, leader.StartTime, worker))
}

// groupEnded tells the guardian a worker's group is gone; g may be nil.
func (g *Guardian) groupEnded(pgid int) {
	if g == nil {
		return
	}
	g.tell(fmt.Sprintf("-%d\n", pgid))
}

// tell writes one line. A guardian that stopped reading must not stall a
// worker's start or end: the write gives up after a second (the line is
// shorter than PIPE_BUF, so it is written whole or not at all).
func (g *Guardian) tell(line string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	_ = g.w.SetWriteDeadline(time.Now().Add(time.Second))
	_, _ = g.w.WriteString(line)
}

// Stop tells the guardian the node is done; it sweeps once more (finding
// nothing, normally; in ModeCgroup it removes the run's cgroup) and exits.
// Stop waits for it, at most a few seconds. Safe to call twice.
func (g *Guardian) Stop() {
	g.mu.Lock()
	g.w.Close()
	g.mu.Unlock()
	t := time.NewTimer(5 * time.Second)
	defer t.Stop()
	select {
	case <-g.done:
	case <-t.C:
		_ = g.cmd.Process.Kill()
		<-g.done
	}
}

// journalSuffix ends the file in which a guardian records its kills: its
// node, and so the node's NATS connection, is gone, so the next node on the
// state dir publishes them (PublishJournals).
const journalSuffix = ".reaped"

func journalPath(stateDir string, m Marker) string {
	return filepath.Join(nodesDir(stateDir), m.Node+"."+m.Run+journalSuffix)
}

// GuardianMain is the guardian's whole life: args are the node, the run,
// the journal file and, in ModeCgroup, the run's cgroup directory. It
// returns the exit status. Each kill is logged to stderr and appended to
// the journal as one JSON lifecycle event.
func GuardianMain(args []string, stdin io.Reader, stderr io.Writer) int {
	if len(args) != 3 && len(args) != 4 {
		fmt.Fprintln(stderr, "usage: "+GuardianArg+" NODE RUN JOURNAL [CGROUP]")
		return 2
	}
	// Ctrl-C on a terminal reaches the whole foreground group; the node
	// handles it and tells the guardian by closing its end.
	signal.Ignore(syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	os.Stdout.Close() // ready
	groups := readGroupLines(stdin)

	m := Marker{Node: args[0], Run: args[1]}
	var journal []byte
	events := func(e Event) {
		e.Detail = "guardian: the node of run " + m.RunValue() + " is gone; " + e.Detail
		line, _ := json.Marshal(e)
		line = append(line, '\n')
		_, _ = stderr.Write(line)
		journal = append(journal, line...)
	}
	var errs []error
	if len(args) == 4 {
		// Everything of every worker, atomically, whatever it did to its
		// environment or session; then the cgroups go.
		_, err := killCgroupTree(args[3], m, "in the run's cgroup", events, 2*time.Second)
		errs = append(errs, err)
	}
	killGroups(m, groups, events)
	_, err := KillMarked(m, events)
	if !errors.Is(err, ErrNoProcess) {
		errs = append(errs, err)
	}
	err = errors.Join(errs...)
	if len(journal) > 0 {
		// Written once, at the end: a partly written journal would be
		// published as a partial one, never as garbage.
		if werr := os.WriteFile(args[2]+".tmp", journal, 0o600); werr == nil {
			_ = os.Rename(args[2]+".tmp", args[2])
		}
	}
	if err != nil {
		fmt.Fprintf(stderr, "guardian of %s: %v\n", m.RunValue(), err)
		return 1
	}
	return 0
}

// guardedGroup is a worker's process group as the node told the guardian.
type guardedGroup struct {
	leaderStart uint64 // the leader's start time
	worker      string
}

// readGroupLines reads the node's group lines until EOF and returns the
// groups started and not ended. Lines that do not parse are skipped.
func readGroupLines(r io.Reader) map[int]guardedGroup {
	groups := map[int]guardedGroup{}
	br := bufio.NewReaderSize(r, 4096)
	for {
		line, err := br.ReadSlice('\n')
		if err == nil {
			parseGroupLine(strings.TrimSuffix(string(line), "\n"), groups)
			continue
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			// Not a line of ours: drop the rest of it.
			for errors.Is(err, bufio.ErrBufferFull) {
				_, err = br.ReadSlice('\n')
			}
			if err == nil {
				continue
			}
		}
		return groups // EOF, or the pipe failed: either way the node is gone
	}
}

func parseGroupLine(line string, groups map[int]guardedGroup) {
	switch {
	case strings.HasPrefix(line, "+"):
		f := strings.SplitN(line[1:], " ", 3)
		if len(f) < 2 {
			return
		}
		pgid, err1 := strconv.Atoi(f[0])
		start, err2 := strconv.ParseUint(f[1], 10, 64)
		if err1 != nil || err2 != nil || pgid <= 1 {
			return
		}
		g := guardedGroup{leaderStart: start}
		if len(f) == 3 {
			g.worker = f[2]
		}
		groups[pgid] = g
	case strings.HasPrefix(line, "-"):
		if pgid, err := strconv.Atoi(line[1:]); err == nil {
			delete(groups, pgid)
		}
	}
}

// killGroups kills, with SIGKILL to the whole group, every listed worker
// group that is provably still the worker's, and reports each member it
// killed. A group id is the pid of the process that made the group, and
// the kernel does not hand that pid to a new process while the group has
// members (nor, so, let anyone make a new group with that id). So group N
// is still the worker's if
//
//   - its leader still holds pid N (same start time; exited and unreaped
//     counts: the pid is still held), or
//   - the leader is gone but members are left, all in the node's session
//     (the guardian's own; a worker's group never leaves it, since setsid
//     takes a process out of its group).
//
// A pid N held by a process with another start time means the group
// emptied and N was reused: not ours, skipped. What remains is a group
// that emptied, whose id was reused by a process that made a group of its
// own in this session and then exited leaving members, all between the
// node's death and this sweep, milliseconds later.
func killGroups(m Marker, groups map[int]guardedGroup, events Events) {
	if len(groups) == 0 {
		return
	}
	stats, err := scanStats()
	if err != nil {
		return
	}
	session, err := unix.Getsid(0)
	if err != nil {
		return
	}
	self := os.Getpid()
	var killed []int
	for pgid, g := range groups {
		var members []int
		leaderHeld, foreign := false, false
		for _, st := range stats {
			if st.pid == pgid {
				leaderHeld = st.startTime == g.leaderStart
				foreign = !leaderHeld
			}
			if st.pgrp != pgid || st.exited() {
				continue
			}
			if st.session != session || st.pid == self {
				foreign = true
			}
			members = append(members, st.pid)
		}
		if len(members) == 0 || foreign && !leaderHeld {
			continue
		}
		if err := syscall.Kill(-pgid, syscall.SIGKILL); err != nil {
			continue
		}
		for _, pid := range members {
			emit(events, Event{Kind: KindOrphanReaped, Node: m.Node, Run: m.Run, Worker: g.worker, PID: pid, PGID: pgid,
				Detail: "in the process group of worker " + g.worker})
		}
		killed = append(killed, members...)
	}
	// The marker sweep that follows must not find them again, still dying.
	deadline := time.Now().Add(time.Second)
	for pause := time.Millisecond; len(killed) > 0 && time.Now().Before(deadline); pause = min(2*pause, 20*time.Millisecond) {
		killed = slices.DeleteFunc(killed, func(pid int) bool {
			st, err := readStat(pid)
			return err != nil || st.exited()
		})
		if len(killed) > 0 {
			time.Sleep(pause)
		}
	}
}

// PublishJournals reports, through events, the kills that guardians of dead
// runs recorded in stateDir, and removes their journals. A node calls it at
// start, once it can publish.
func PublishJournals(stateDir string, events Events) (int, error) {
	paths, err := filepath.Glob(filepath.Join(nodesDir(stateDir), "*"+journalSuffix))
	if err != nil {
		return 0, fmt.Errorf("lifecycle: journals: %w", err)
	}
	n := 0
	var errs []error
	for _, path := range paths {
		data, err := os.ReadFile(path)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, line := range bytes.Split(data, []byte("\n")) {
			var e Event
			if len(line) == 0 || json.Unmarshal(line, &e) != nil {
				continue
			}
			emit(events, e)
			n++
		}
		if err := os.Remove(path); err != nil {
			errs = append(errs, err)
		}
	}
	return n, errors.Join(errs...)
}
