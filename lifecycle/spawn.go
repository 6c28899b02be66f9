package lifecycle

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// maxLine is the longest line handed to an output callback; longer lines
// arrive in pieces so that a worker printing megabytes without a newline
// cannot make the node buffer them.
const maxLine = 64 << 10

// drainTimeout bounds how long a process's output readers may run after its
// leader has been reaped. They normally stop at once, when the last writer
// dies with the group; only a descendant that left the group (setsid) and
// still holds the pipes keeps them open.
const drainTimeout = 2 * time.Second

// Spawner forks every child from one goroutine locked to its OS thread for
// its whole life, because Pdeathsig fires when the forking *thread* exits
// (golang/go#27505), not the process: a child forked from an ordinary
// goroutine dies whenever the runtime retires the thread it ran on, which it
// does when any goroutine exits while locked to it.
type Spawner struct {
	reqs      chan func()
	quit      chan struct{}
	done      chan struct{}
	closeOnce sync.Once
	spawns    atomic.Uint64 // numbers the marked starts, for EnvWorkerSpawn

	mu       sync.Mutex
	children map[int]marks // pid -> marks of every child started and not yet reaped
}

// NewSpawner starts the spawner's goroutine. Close it after every process it
// started has been stopped.
func NewSpawner() *Spawner {
	s := &Spawner{
		reqs:     make(chan func()),
		quit:     make(chan struct{}),
		done:     make(chan struct{}),
		children: make(map[int]marks),
	}
	go s.loop()
	return s
}

func (s *Spawner) loop() {
	defer close(s.done)
	// Never unlocked: no other goroutine may ever run on this thread (one
	// that locked it and exited would end it), and when this goroutine
	// returns the runtime ends the thread, so any child still running gets
	// its Pdeathsig rather than outliving its supervision.
	runtime.LockOSThread()
	for {
		select {
		case fn := <-s.reqs:
			fn()
		case <-s.quit:
			return
		}
	}
}

// Close stops the spawner's goroutine and waits for it. It is idempotent.
// Stop every process it started first: Close does not supervise their end,
// though the kernel will likely SIGKILL them (Pdeathsig) as the thread ends.
func (s *Spawner) Close() {
	s.closeOnce.Do(func() { close(s.quit) })
	<-s.done
}

// forget drops a reaped child from the spawner's children.
func (s *Spawner) forget(pid int) {
	s.mu.Lock()
	delete(s.children, pid)
	s.mu.Unlock()
}

// do runs fn on the spawner's thread and waits for it.
func (s *Spawner) do(fn func()) error {
	ran := make(chan struct{})
	select {
	case s.reqs <- func() { defer close(ran); fn() }:
	case <-s.quit:
		return ErrSpawnerClosed
	}
	<-ran
	return nil
}

// StartOptions configures Start.
type StartOptions struct {
	// Stdout and Stderr are called once per line of the child's output,
	// without the newline, from the process's reader goroutines (one per
	// stream, so calls for one stream never overlap). Lines longer than 64
	// KiB arrive in pieces. The slice is the callback's to keep. Nil
	// discards the stream. They must not block for long: a full pipe stalls
	// the child.
	Stdout func(line []byte)
	Stderr func(line []byte)

	// Marker, if set, marks the process and everything it starts (Start
	// adds EnvWorkerRun, EnvWorkerID and EnvWorkerSpawn to cmd's
	// environment), and when the process exits every process still
	// carrying the marks of this start is killed too: descendants that left
	// the process group with setsid or a double fork die with the worker.
	Marker Marker

	// Events receives an orphan_reaped event for each such kill. May be nil.
	Events Events

	// Contain, if set, puts the process and its descendants in a container
	// (see Containment) prepared before the fork; when the leader exits the
	// container is killed with its group, and released after the reap.
	// Nil is ModeGroup.
	Contain Containment

	// Limits, if set, are enforced on the container: Contain must be a
	// Limiter whose CheckLimits accepts them, else Start fails.
	Limits Limits

	// Guardian, if set, is told the process group as soon as it exists and
	// again once it is gone, so that if the node dies in between the
	// guardian kills the group, with whatever in it dropped the marker.
	Guardian *Guardian
}

// ExitStatus is how a process ended.
type ExitStatus struct {
	Code   int    // exit code, or -1 if a signal ended the process
	Signal string // the signal's name, such as "SIGKILL", or ""
	// OOMKilled says the kernel's OOM killer killed processes in the
	// process's container (over its Limits.Memory); only a container with
	// Accounting can tell.
	OOMKilled bool
}

func (e ExitStatus) String() string {
	if e.Signal != "" {
		return "signal " + e.Signal
	}
	return fmt.Sprintf("exit status %d", e.Code)
}

// Process is a child started by Start. It owns the child's wait goroutine and
// its two output readers; all three end on their own within seconds of the
// child's exit, whether or not anyone calls Stop.
type Process struct {
	spawner *Spawner
	cmd     *exec.Cmd
	marks   marks     // the marks Start gave it; zero if unmarked
	box     Container // its container (see StartOptions.Contain)
	guard   *Guardian // told when its group is gone; may be nil
	events  Events
	id      Identity
	pgid    int
	outR    *os.File
	errR    *os.File
	exited  chan struct{} // closed when the leader has been reaped
	done    chan struct{} // closed when it has been reaped and its readers have stopped
	exit    ExitStatus    // written before exited is closed
	readers atomic.Int32  // output readers still running
	drained chan struct{} // closed by the last reader to stop
	mu      sync.RWMutex  // read-held while signalling the group, write-held while reaping
	reaped  bool
}

// Start starts cmd in its own process group with Pdeathsig SIGKILL, forking on
// the spawner's thread, and supervises it: a wait goroutine reaps it and two
// reader goroutines pass its output lines to opts. Start sets cmd's Stdout,
// Stderr and the Setpgid, Pgid and Pdeathsig fields of its SysProcAttr.
//
// When the leader exits, for whatever reason, its process group is killed
// with SIGKILL before the leader is reaped: nothing it started in its group
// outlives it.
func Start(s *Spawner, cmd *exec.Cmd, opts StartOptions) (*Process, error) {
	if err := ownCommand(cmd); err != nil {
		return nil, err
	}
	k, err := s.mark(cmd, opts.Marker)
	if err != nil {
		return nil, err
	}
	box, err := contain(cmd, opts)
	if err != nil {
		return nil, err
	}
	out, err := openOutput(cmd)
	if err != nil {
		_ = box.Release()
		return nil, err
	}
	id, execFailed, err := s.fork(cmd, k)
	// The child has its own copies; ours would keep the readers from ever
	// seeing EOF.
	out.closeWriteEnds()
	if err != nil {
		out.closeReadEnds()
		if !execFailed {
			_ = box.Kill() // the child was forked into it, then killed
		}
		_ = box.Release()
		return nil, err
	}
	// The leader is unreaped, so its group id is ours until wait reaps it,
	// and wait tells the guardian the group is gone before that.
	opts.Guardian.groupStarted(cmd.Process.Pid, id, opts.Marker.Worker)
	return supervise(s, cmd, k, box, id, out, opts), nil
}

// ownCommand checks that cmd leaves to Start what Start must own, and sets
// its process group and Pdeathsig.
func ownCommand(cmd *exec.Cmd) error {
	switch {
	case cmd.Process != nil:
		return fmt.Errorf("%w: already started", ErrBadCommand)
	case cmd.Stdout != nil || cmd.Stderr != nil:
		return fmt.Errorf("%w: Stdout and Stderr belong to Start", ErrBadCommand)
	case cmd.SysProcAttr != nil && (cmd.SysProcAttr.Setsid || cmd.SysProcAttr.Foreground):
		return fmt.Errorf("%w: Setsid or Foreground would leave the process group", ErrBadCommand)
	}
	var attr syscall.SysProcAttr
	if cmd.SysProcAttr != nil {
		attr = *cmd.SysProcAttr
	}
	attr.Setpgid, attr.Pgid, attr.Pdeathsig = true, 0, syscall.SIGKILL
	cmd.SysProcAttr = &attr
	return nil
}

// mark adds m's marks, and a number for this start, to cmd's environment;
// zero marks for a zero m.
func (s *Spawner) mark(cmd *exec.Cmd, m Marker) (marks, error) {
	if m.IsZero() {
		return marks{}, nil
	}
	if err := m.valid(); err != nil {
		return marks{}, err
	}
	k := marks{run: m.RunValue(), id: m.IDValue(), spawn: strconv.FormatUint(s.spawns.Add(1), 10)}
	if cmd.Env == nil {
		cmd.Env = os.Environ()
	}
	// Appended last, so they win over any inherited marks: os/exec keeps
	// the last of duplicate keys.
	cmd.Env = append(cmd.Env, append(m.Env(), EnvWorkerSpawn+"="+k.spawn)...)
	return k, nil
}

// contain prepares the container cmd will be forked into (see
// StartOptions.Contain and Limits).
func contain(cmd *exec.Cmd, opts StartOptions) (Container, error) {
	if !opts.Limits.IsZero() {
		l, ok := opts.Contain.(Limiter)
		if !ok {
			return nil, fmt.Errorf("%w: limits %+v need a containment that enforces them, not %v", ErrContainmentUnavailable, opts.Limits, modeOf(opts.Contain))
		}
		c, err := l.PrepareLimited(cmd, opts.Marker, opts.Limits)
		if err != nil {
			return nil, fmt.Errorf("lifecycle: contain %s: %w", cmd.Path, err)
		}
		return c, nil
	}
	if opts.Contain != nil {
		c, err := opts.Contain.Prepare(cmd, opts.Marker)
		if err != nil {
			return nil, fmt.Errorf("lifecycle: contain %s: %w", cmd.Path, err)
		}
		return c, nil
	}
	return noContainer{}, nil
}

// outputPipes are the child's stdout and stderr: the write ends are the
// child's, the read ends its Process's readers'.
type outputPipes struct {
	outR, outW, errR, errW *os.File
}

// openOutput makes the pipes and sets them as cmd's Stdout and Stderr.
func openOutput(cmd *exec.Cmd) (*outputPipes, error) {
	outR, outW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("lifecycle: stdout pipe: %w", err)
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		return nil, fmt.Errorf("lifecycle: stderr pipe: %w", err)
	}
	cmd.Stdout, cmd.Stderr = outW, errW
	return &outputPipes{outR: outR, outW: outW, errR: errR, errW: errW}, nil
}

func (o *outputPipes) closeWriteEnds() {
	o.outW.Close()
	o.errW.Close()
}

func (o *outputPipes) closeReadEnds() {
	o.outR.Close()
	o.errR.Close()
}

// fork starts cmd on the spawner's thread and reads its identity. On an
// error no child of it is left: execFailed says cmd.Start failed, so that no
// child ever was; one that started but could not be identified has been
// killed and reaped.
func (s *Spawner) fork(cmd *exec.Cmd, k marks) (id Identity, execFailed bool, err error) {
	var startErr, idErr error
	err = s.do(func() {
		if startErr = cmd.Start(); startErr == nil {
			// Read before anyone waits for the child: unreaped, its pid
			// cannot be reused, so this is the child's own start time.
			id, idErr = ReadIdentity(cmd.Process.Pid)
			// Registered on this thread, before any other fork, so that
			// ReapAdopted (which classifies children on this thread too)
			// never takes it for an orphan.
			s.mu.Lock()
			s.children[cmd.Process.Pid] = k
			s.mu.Unlock()
		}
	})
	switch {
	case err != nil:
		return id, false, err
	case startErr != nil:
		return id, true, fmt.Errorf("lifecycle: start %s: %w", cmd.Path, startErr)
	case idErr != nil:
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		s.forget(cmd.Process.Pid)
		return id, false, fmt.Errorf("lifecycle: identify %s: %w", cmd.Path, idErr)
	}
	return id, false, nil
}

// supervise makes the Process for a child just forked and starts its wait
// goroutine and its two output readers.
func supervise(s *Spawner, cmd *exec.Cmd, k marks, box Container, id Identity, out *outputPipes, opts StartOptions) *Process {
	p := &Process{
		spawner: s,
		cmd:     cmd,
		marks:   k,
		box:     box,
		guard:   opts.Guardian,
		events:  opts.Events,
		id:      id,
		pgid:    cmd.Process.Pid,
		outR:    out.outR,
		errR:    out.errR,
		exited:  make(chan struct{}),
		done:    make(chan struct{}),
		drained: make(chan struct{}),
	}
	p.readers.Store(2)
	go p.readLines(p.outR, opts.Stdout)
	go p.readLines(p.errR, opts.Stderr)
	go p.wait()
	return p
}

// Memory is what the process's whole tree uses now, as its container
// accounts for it (memory.current of its cgroup); ok is false when the
// container does not (then TreeRSS is the measure).
func (p *Process) Memory() (bytes uint64, ok bool) {
	if a, isAcc := p.box.(Accounting); isAcc {
		return a.Memory()
	}
	return 0, false
}

// PID returns the process id of the leader.
func (p *Process) PID() int { return p.id.PID }

// PGID returns the id of the process group Start created for it.
func (p *Process) PGID() int { return p.pgid }

// Identity returns the leader's identity, read right after it started.
func (p *Process) Identity() Identity { return p.id }

// Done is closed once the process has exited and been reaped, the rest of its
// group has been killed and has exited, and its output readers have stopped.
func (p *Process) Done() <-chan struct{} { return p.done }

// Exit returns how the process ended. It is valid once Done is closed.
func (p *Process) Exit() ExitStatus { return p.exit }

// Stop sends SIGTERM to the process group, waits up to grace for the leader
// to exit, then sends SIGKILL to the group, and returns once Done is closed.
// It is idempotent and safe to call from several goroutines at once; a call
// with a shorter grace escalates a call with a longer one already waiting.
func (p *Process) Stop(grace time.Duration) {
	if grace > 0 {
		p.signal(syscall.SIGTERM)
		t := time.NewTimer(grace)
		select {
		case <-p.exited:
		case <-t.C:
		}
		t.Stop()
	}
	p.signal(syscall.SIGKILL)
	<-p.done
}

// Kill is Stop(0): SIGKILL to the group at once.
func (p *Process) Kill() { p.Stop(0) }

// signal sends sig to the process group and makes sure the leader gets it
// even if it moved to another group.
//
// Signalling a group by number is safe only while the number cannot have
// been reused. The group id is the leader's pid, and a pid is not reused
// while any process still holds it as pid or as process group id: until the
// leader is reaped (even as a zombie) it holds it, and only its own
// descendants can be members of a group it leads. Holding mu for reading
// keeps the wait goroutine from reaping in between.
func (p *Process) signal(sig syscall.Signal) {
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.reaped {
		return
	}
	_ = syscall.Kill(-p.pgid, sig)
	// Once the leader has been signalled through its group, a second
	// SIGTERM could be taken for a second, impatient, request to stop.
	if pg, err := syscall.Getpgid(p.id.PID); sig == syscall.SIGKILL || err != nil || pg != p.pgid {
		// os.Process signals through a pidfd: it reaches this very
		// process or none.
		_ = p.cmd.Process.Signal(sig)
	}
}

// wait owns cmd.Wait. It waits for the leader to exit without reaping it,
// kills the group while the leader's zombie still pins the group id, reaps
// the leader, and lets the readers drain.
func (p *Process) wait() {
	swept := p.waitLeader()
	// Only this goroutine reaps, so until it does the group id is ours.
	_ = syscall.Kill(-p.pgid, syscall.SIGKILL)
	waitGroupGone(p.pgid, p.id.PID, drainTimeout)
	// Whatever of this start left the group dies now too (once: an init's
	// namespace, which nothing leaves, was swept before the init died).
	if !swept {
		p.killMarkedLeftovers()
	}
	// The container holds what is left, whatever its environment or
	// session: what dropped the marks, and what forked meanwhile.
	_ = p.box.Kill()
	// Read while the container still exists; its tree is dead by now.
	oom := false
	if a, ok := p.box.(Accounting); ok {
		oom = a.OOMKills() > 0
	}
	// Before the reap: once the leader is reaped the group id is no
	// longer ours, and the guardian must not kill it any more.
	p.guard.groupEnded(p.pgid)
	p.mu.Lock()
	_ = p.cmd.Wait()
	p.reaped = true
	p.mu.Unlock()
	p.spawner.forget(p.id.PID)
	p.exit = exitStatus(p.cmd.ProcessState)
	if r, ok := p.box.(ExitReporter); ok {
		p.exit = r.Exit(p.exit)
	}
	p.exit.OOMKilled = oom
	_ = p.box.Release()
	close(p.exited)

	t := time.NewTimer(drainTimeout)
	select {
	case <-p.drained:
	case <-t.C:
		// A descendant outside the group holds the write ends. Closing
		// the read ends stops the readers (the pipes are in the runtime
		// poller, so Close interrupts a blocked Read); that descendant
		// then gets EPIPE.
		p.outR.Close()
		p.errR.Close()
		<-p.drained
	}
	t.Stop()
	close(p.done)
}

// commandEnder is a Container whose leader outlives the command it runs:
// ModePIDNS's init, which waits to be killed once its command has ended.
type commandEnder interface {
	// CommandEnded is closed when the command has ended.
	CommandEnded() <-chan struct{}
}

// waitLeader returns once the leader has exited, without reaping it. A
// leader that is an init is killed once its command has ended, after the
// command's marked leftovers, which still run in its namespace, have been
// killed, each an orphan_reaped event: the init's death would have killed
// them unreported. swept says that sweep was made.
func (p *Process) waitLeader() (swept bool) {
	ce, ok := p.box.(commandEnder)
	if !ok {
		// No error is expected for our own unreaped child; if one came,
		// cmd.Wait would do the blocking, only without the group kill
		// before the reap.
		_ = waitExited(p.id.PID)
		return false
	}
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		_ = waitExited(p.id.PID)
	}()
	select {
	case <-exited:
		return false
	case <-ce.CommandEnded():
	}
	p.killMarkedLeftovers()
	_ = p.box.Kill()
	// The init is unreaped: its group id is still ours.
	_ = syscall.Kill(-p.pgid, syscall.SIGKILL)
	<-exited
	return true
}

// killMarkedLeftovers kills whatever of this start carries its marks, each
// kill an orphan_reaped event. A failed scan leaves the rest to the
// container, then to the Reaper.
func (p *Process) killMarkedLeftovers() {
	if p.marks == (marks{}) {
		return
	}
	// Not the leader: an init carries the marks too, and is killed after.
	k, leader := p.marks, p.id.PID
	_, _ = killMarked(func(pid int, m marks) bool { return m == k && pid != leader }, "outlived worker "+k.id, p.events)
}

// waitGroupGone waits, up to limit, until every member of group pgid other
// than its leader has exited. A SIGKILLed process takes a moment to die, and
// one that does not hold the output pipes would otherwise still be running
// when Stop returns. No process can join the group meanwhile: a pending
// SIGKILL aborts a member's fork, and only a process in the leader's session
// could move in.
func waitGroupGone(pgid, leader int, limit time.Duration) {
	stats, err := scanStats()
	if err != nil {
		return
	}
	var members []int
	for _, st := range stats {
		if st.pgrp == pgid && st.pid != leader && !st.exited() {
			members = append(members, st.pid)
		}
	}
	deadline := time.Now().Add(limit)
	for pause := time.Millisecond; len(members) > 0 && time.Now().Before(deadline); pause = min(2*pause, 20*time.Millisecond) {
		members = slices.DeleteFunc(members, func(pid int) bool {
			st, err := readStat(pid)
			return err != nil || st.exited() || st.pgrp != pgid
		})
		if len(members) > 0 {
			time.Sleep(pause)
		}
	}
}

// waitExited blocks until pid has exited, leaving it unreaped (WNOWAIT).
func waitExited(pid int) error {
	for {
		var info unix.Siginfo
		err := unix.Waitid(unix.P_PID, pid, &info, unix.WEXITED|unix.WNOWAIT, nil)
		if err != unix.EINTR {
			return err
		}
	}
}

// modeOf names a Containment's mode for an error; nil is ModeGroup.
func modeOf(c Containment) string {
	if c == nil {
		return ModeGroup
	}
	return c.Mode()
}

func exitStatus(ps *os.ProcessState) ExitStatus {
	if ps == nil {
		return ExitStatus{Code: -1}
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return ExitStatus{Code: -1, Signal: unix.SignalName(ws.Signal())}
	}
	return ExitStatus{Code: ps.ExitCode()}
}

// readLines passes each line of f to fn until f reaches EOF or is closed.
func (p *Process) readLines(f *os.File, fn func([]byte)) {
	defer func() {
		f.Close()
		if p.readers.Add(-1) == 0 {
			close(p.drained)
		}
	}()
	if fn == nil {
		_, _ = io.Copy(io.Discard, f)
		return
	}
	br := bufio.NewReaderSize(f, maxLine)
	split := false // the previous piece was a full buffer with no newline
	for {
		line, err := br.ReadSlice('\n')
		switch {
		case err == nil:
			// A newline right after a split piece ends that line; it is
			// not an empty line of its own.
			if !(split && len(line) == 1) {
				fn(bytes.Clone(line[:len(line)-1]))
			}
			split = false
		case errors.Is(err, bufio.ErrBufferFull):
			fn(bytes.Clone(line))
			split = true
		default:
			if len(line) > 0 {
				fn(bytes.Clone(line))
			}
			return
		}
	}
}
