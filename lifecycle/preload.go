package lifecycle

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Preloaded workers (--preload): a template process imports the app once
// and forks each worker from itself (python/pyfleet/template.py has the
// protocol). A forked worker must be what a started one is: its own process
// group, its own marks in /proc/<pid>/environ, its container, a child of
// the node that the node waits for and reaps. The template forks an
// intermediate that forks the worker; once the node has registered the
// worker's pid as its child (so that ReapAdopted never takes it for an
// orphan), the template kills the intermediate and the worker is re-parented
// to the node, a child subreaper (subreaper.go). From then on the worker's
// Process is supervised exactly as Start's are: waitid on its pid, the
// group kill before the reap, the marked-leftovers sweep, the container.
//
// In the PID namespace modes the template stays in the node's namespace
// (templateContainment) and each worker gets a namespace of its own: the
// intermediate unshares it, its first child A becomes the namespace's
// PID 1, forks the worker and execs the node's init in adopt mode
// (pidinit.Adopt). A is then what the node registers, is re-parented to,
// and supervises as it does an init it started (a pidnsContainer reads the
// worker's status from it); the worker is A's child, as under a started
// init, and runs nothing of the app before A, adopted by the node, lets it.

// EnvTemplateFD names the template's end of its socket to the node.
const EnvTemplateFD = "PYFLEET_TEMPLATE_FD"

// envTemplatePad pads the template's environment: a worker rewrites the
// environment block it inherits in place (it cannot grow it), and its
// environment differs from the template's by its marks and fds.
const envTemplatePad = "PYFLEET_TEMPLATE_PAD"

const templatePadBytes = 4096

// ErrNotPreloadable is wrapped by the error of a Fork that cannot give the
// worker what a start would; a plain Start can.
var ErrNotPreloadable = errors.New("cannot be preloaded")

// ErrTemplateGone is wrapped by Fork's error once the template has died or
// broken its protocol; start plainly and start a new template.
var ErrTemplateGone = errors.New("template gone")

// Preloadable says whether workers of containment c can be forked from a
// template, and if not why. Every mode lifecycle provides can: group and
// cgroup as they are; the PID namespace modes (ModePIDNS, and ModeCgroup
// where the host allows namespaces) by an init that adopts the forked
// worker (see Fork). A Containment of another kind cannot: a fork does not
// go through its Prepare.
func Preloadable(c Containment) error {
	switch c.(type) {
	case nil, groupContainment, *cgroupContainment, *pidnsContainment:
		return nil
	}
	return fmt.Errorf("%w: containment %s is not one lifecycle knows how to enter from a fork", ErrNotPreloadable, c.Mode())
}

// templateContainment is c without PID namespaces: the template must live
// in the node's PID namespace, or every process it forks would stay in (and
// be re-parented within) the template's own. ModePIDNS's template is kept
// as ModeGroup's; ModeCgroup's in its cgroup, without an init. It is still
// marked, recorded, grouped and killed as a worker is; each worker it
// forks gets its own namespace (see Fork).
func templateContainment(c Containment) Containment {
	switch c := c.(type) {
	case *pidnsContainment:
		return GroupContainment()
	case *cgroupContainment:
		if c.ns != nil {
			cp := *c
			cp.ns, cp.nsWhy = nil, errors.New("a template runs in the node's PID namespace")
			return &cp
		}
	}
	return c
}

// namespacesOf is the PID namespace containment each of c's workers gets,
// or nil.
func namespacesOf(c Containment) *pidnsContainment {
	switch c := c.(type) {
	case *pidnsContainment:
		return c
	case *cgroupContainment:
		return c.ns
	}
	return nil
}

// Template is a running template: its Process (started, marked, contained
// and supervised as a worker is) and the node's end of its socket. Forks
// overlap: each has its own dialogue, numbered, and one reader goroutine
// hands each answer to the Fork waiting for it.
type Template struct {
	spawner *Spawner
	proc    *Process
	conn    *net.UnixConn
	envSize int // bytes of the template's environment block

	sendMu sync.Mutex    // one message, and the fds with it, at a time
	slots  chan struct{} // dialogues in flight, at most maxForksInFlight

	mu      sync.Mutex
	nextID  uint64
	waiting map[uint64]chan templateAnswer
	broken  error // set once, when the template is of no more use

	readerDone chan struct{}
}

// templateAnswer is one message of the template about a fork
// (python/pyfleet/template.py has the protocol).
type templateAnswer struct {
	ID      uint64 `json:"id"`
	PID     int    `json:"pid"`
	Adopted int    `json:"adopted"`
	Error   string `json:"error"`
}

// StartTemplate starts cmd (python -m pyfleet.template ...) as Start does,
// with the template's socket added to its ExtraFiles, and waits up to
// timeout for the template to say it is ready. The error of a template that
// refused to serve (the app failed to import, threads were alive after it)
// wraps ErrNotPreloadable and says why.
func StartTemplate(s *Spawner, cmd *exec.Cmd, opts StartOptions, timeout time.Duration) (*Template, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("lifecycle: template socket: %w", err)
	}
	ours, theirs := os.NewFile(uintptr(fds[0]), "template"), os.NewFile(uintptr(fds[1]), "template-child")
	fc, err := net.FileConn(ours)
	ours.Close()
	if err != nil {
		theirs.Close()
		return nil, fmt.Errorf("lifecycle: template socket: %w", err)
	}
	conn := fc.(*net.UnixConn)
	if cmd.Env == nil {
		cmd.Env = os.Environ()
	}
	cmd.Env = append(cmd.Env,
		EnvTemplateFD+"="+strconv.Itoa(3+len(cmd.ExtraFiles)),
		envTemplatePad+"="+strings.Repeat("x", templatePadBytes))
	cmd.ExtraFiles = append(cmd.ExtraFiles, theirs)
	opts.Contain = templateContainment(opts.Contain)
	proc, err := Start(s, cmd, opts)
	theirs.Close()
	if err != nil {
		conn.Close()
		return nil, err
	}
	t := &Template{spawner: s, proc: proc, conn: conn, envSize: envBlockSize(cmd.Env),
		waiting: make(map[uint64]chan templateAnswer), readerDone: make(chan struct{}),
		slots: make(chan struct{}, maxForksInFlight)}
	var hello struct {
		Ready int    `json:"ready"`
		Error string `json:"error"`
	}
	if err := t.recv(&hello, timeout); err != nil || hello.Ready == 0 {
		close(t.readerDone)
		t.Stop(0)
		if err == nil {
			err = fmt.Errorf("%w: %s", ErrNotPreloadable, hello.Error)
		}
		return nil, err
	}
	_ = conn.SetReadDeadline(time.Time{})
	go t.read()
	return t, nil
}

// read hands each of the template's answers to the Fork waiting for it,
// until the socket fails (the template died, broke the protocol, or Stop
// closed it); then every waiting Fork learns that the template is gone.
func (t *Template) read() {
	defer close(t.readerDone)
	for {
		var a templateAnswer
		err := t.recv(&a, 0)
		t.mu.Lock()
		if err != nil {
			t.breakLocked(err)
			t.mu.Unlock()
			return
		}
		ch, ok := t.waiting[a.ID]
		if ok {
			select {
			case ch <- a: // buffered for every answer of a dialogue
			default:
				ok = false
			}
		}
		t.mu.Unlock()
		if !ok {
			t.fail(fmt.Errorf("%w: an answer about no fork waiting for one (id %d)", ErrTemplateGone, a.ID))
			return
		}
	}
}

// fail makes the template of no more use: every Fork waiting and every
// later one fails with err.
func (t *Template) fail(err error) {
	t.mu.Lock()
	t.breakLocked(err)
	t.mu.Unlock()
	_ = t.conn.Close()
}

func (t *Template) breakLocked(err error) {
	if t.broken == nil {
		t.broken = err
	}
	for id, ch := range t.waiting {
		close(ch)
		delete(t.waiting, id)
	}
}

// Process is the template's own process.
func (t *Template) Process() *Process { return t.proc }

// Stop stops the template's process (see Process.Stop) and closes the
// node's end of its socket.
func (t *Template) Stop(grace time.Duration) {
	t.fail(fmt.Errorf("%w: stopped", ErrTemplateGone)) // EOF: the template exits by itself
	<-t.readerDone
	t.proc.Stop(grace)
}

// envBlockSize is the size of the block the kernel lays env out in.
func envBlockSize(env []string) int {
	n := 0
	for _, kv := range env {
		n += len(kv) + 1
	}
	return n
}

func (t *Template) send(v any, files []*os.File) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	var oob []byte
	if len(files) > 0 {
		fds := make([]int, len(files))
		for i, f := range files {
			fds[i] = int(f.Fd())
		}
		oob = unix.UnixRights(fds...)
	}
	t.sendMu.Lock()
	defer t.sendMu.Unlock()
	_ = t.conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
	_, _, err = t.conn.WriteMsgUnix(b, oob, nil)
	return err
}

// recv reads one message into v, waiting up to timeout (0: no limit).
func (t *Template) recv(v any, timeout time.Duration) error {
	buf := make([]byte, 4096)
	if timeout > 0 {
		_ = t.conn.SetReadDeadline(time.Now().Add(timeout))
	}
	n, _, _, _, err := t.conn.ReadMsgUnix(buf, nil)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrTemplateGone, err)
	}
	if n == 0 {
		return fmt.Errorf("%w: it closed its socket", ErrTemplateGone)
	}
	if err := json.Unmarshal(buf[:n], v); err != nil {
		return fmt.Errorf("%w: bad message %q: %w", ErrTemplateGone, buf[:n], err)
	}
	return nil
}

// Fork starts cmd, which must be `python -m pyfleet.worker ...` for the
// template's app, as Start would, by a fork of the template. The options
// mean what they mean for Start; Contain must be Preloadable. In the PID
// namespace modes the Process is the worker's init, as for Start. An error
// wrapping ErrTemplateGone means the template is of no more use; one
// wrapping ErrNotPreloadable that this start is not (start it plainly).
func (t *Template) Fork(cmd *exec.Cmd, opts StartOptions) (*Process, error) {
	if err := Preloadable(opts.Contain); err != nil {
		return nil, err
	}
	if err := ownCommand(cmd); err != nil {
		return nil, err
	}
	k, err := t.spawner.mark(cmd, opts.Marker)
	if err != nil {
		return nil, err
	}
	if cmd.Env == nil {
		cmd.Env = os.Environ()
	}
	if n := envBlockSize(cmd.Env); n > t.envSize {
		return nil, fmt.Errorf("%w: the worker's environment (%d bytes) is larger than the template's (%d bytes)", ErrNotPreloadable, n, t.envSize)
	}
	// The namespaces are the template's to make (its intermediate
	// unshares them); the rest of the container is prepared here as for a
	// start.
	ns := namespacesOf(opts.Contain)
	opts.Contain = templateContainment(opts.Contain)
	box, err := contain(cmd, opts)
	if err != nil {
		return nil, err
	}
	var statusW *os.File
	if ns != nil {
		r, w, err := os.Pipe()
		if err != nil {
			_ = box.Release()
			return nil, fmt.Errorf("lifecycle: pidns: status pipe: %w", err)
		}
		statusW = w
		box = withNamespace(box, newPIDNSContainer(r, w))
	}
	out, err := openOutput(cmd)
	if err != nil {
		_ = box.Release()
		return nil, err
	}
	files := append([]*os.File{out.outW, out.errW}, cmd.ExtraFiles...)
	intoCgroup := cmd.SysProcAttr.UseCgroupFD
	var cgroupDir *os.File
	if intoCgroup {
		// Prepare's fd is the container's to close; the message needs
		// its own.
		fd, err := unix.Dup(cmd.SysProcAttr.CgroupFD)
		if err != nil {
			out.closeWriteEnds()
			out.closeReadEnds()
			_ = box.Release()
			return nil, fmt.Errorf("lifecycle: cgroup fd: %w", err)
		}
		cgroupDir = os.NewFile(uintptr(fd), "cgroup")
		defer cgroupDir.Close()
		files = append(files, cgroupDir)
	}
	if statusW != nil {
		// Last: the init's status pipe (pidnsContainer), which the
		// template passes to the init and the worker does not get.
		files = append(files, statusW)
	}
	var (
		id  Identity
		pid int
	)
	id, pid, err = t.fork(cmd, k, files, intoCgroup, ns)
	out.closeWriteEnds()
	if err != nil {
		out.closeReadEnds()
		_ = box.Kill() // a worker that got as far as its cgroup
		_ = box.Release()
		return nil, err
	}
	opts.Guardian.groupStarted(pid, id, opts.Marker.Worker)
	return supervise(t.spawner, cmd, k, box, id, out, opts), nil
}

// fork is Fork's dialogue with the template. The worker's pid (or, in
// a PID namespace, its init's) is registered as the spawner's child before
// the template lets it be re-parented to the node, so that ReapAdopted
// never takes it for an orphan: until the intermediate dies it is not the
// node's child at all.
func (t *Template) fork(cmd *exec.Cmd, k marks, files []*os.File, intoCgroup bool, ns *pidnsContainment) (Identity, int, error) {
	req := map[string]any{"argv": cmd.Args, "env": cmd.Env, "dir": cmd.Dir, "node": os.Getpid(), "cgroup": intoCgroup}
	if ns != nil {
		req["pidns"] = map[string]any{"init": ns.exe, "parent": ns.parent, "userns": !ns.root}
	}
	if req["dir"] == "" {
		wd, err := os.Getwd()
		if err != nil {
			return Identity{}, 0, err
		}
		req["dir"] = wd
	}
	t.slots <- struct{}{}
	defer func() { <-t.slots }()
	ident, answers, err := t.open()
	if err != nil {
		return Identity{}, 0, err
	}
	defer t.close(ident)
	req["id"] = ident
	if err := t.send(req, files); err != nil {
		t.fail(fmt.Errorf("%w: %w", ErrTemplateGone, err))
		return Identity{}, 0, t.gone()
	}
	forked, err := t.await(answers)
	if err != nil {
		return Identity{}, 0, err
	}
	if forked.PID <= 0 {
		return Identity{}, 0, fmt.Errorf("%w: %s", ErrNotPreloadable, forked.Error)
	}
	id, err := ReadIdentity(forked.PID)
	if err != nil {
		// It died at once: the template's intermediate reaps it.
		_ = t.send(map[string]any{"id": ident, "go": false}, nil)
		return Identity{}, 0, fmt.Errorf("lifecycle: identify forked worker: %w", err)
	}
	t.spawner.mu.Lock()
	t.spawner.children[forked.PID] = k
	t.spawner.mu.Unlock()
	err = t.send(map[string]any{"id": ident, "go": true}, nil)
	var adopted templateAnswer
	if err == nil {
		adopted, err = t.await(answers)
	} else {
		t.fail(fmt.Errorf("%w: %w", ErrTemplateGone, err))
		err = t.gone()
	}
	if err == nil && adopted.Adopted != forked.PID {
		err = fmt.Errorf("%w: adopted %d, not %d", ErrTemplateGone, adopted.Adopted, forked.PID)
		t.fail(err)
	}
	p, perr := os.FindProcess(forked.PID)
	if err == nil {
		err = perr
	}
	if err != nil {
		// Ours or soon ours: killed, and reaped once it is our child.
		_ = unix.Kill(forked.PID, unix.SIGKILL)
		t.spawner.forget(forked.PID)
		return Identity{}, 0, err
	}
	cmd.Process = p
	return id, forked.PID, nil
}

// maxForksInFlight bounds the dialogues under way at once: enough for
// the template's forks to overlap with the intermediates' and with the
// node's part, few enough that each answer comes well within
// forkAnswerTimeout and the requests fit the socket's buffer.
const maxForksInFlight = 8

// forkAnswerTimeout bounds each wait for the template: a template that
// does not answer a fork within it is taken for broken.
const forkAnswerTimeout = 10 * time.Second

// open numbers a new dialogue and returns where its answers arrive.
func (t *Template) open() (uint64, chan templateAnswer, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.broken != nil {
		return 0, nil, t.broken
	}
	t.nextID++
	ch := make(chan templateAnswer, 2) // the pid and the adoption
	t.waiting[t.nextID] = ch
	return t.nextID, ch, nil
}

func (t *Template) close(ident uint64) {
	t.mu.Lock()
	delete(t.waiting, ident)
	t.mu.Unlock()
}

func (t *Template) gone() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.broken
}

// await waits for the dialogue's next answer.
func (t *Template) await(answers chan templateAnswer) (templateAnswer, error) {
	timer := time.NewTimer(forkAnswerTimeout)
	defer timer.Stop()
	select {
	case a, ok := <-answers:
		if !ok {
			return a, t.gone()
		}
		return a, nil
	case <-timer.C:
		err := fmt.Errorf("%w: no answer to a fork within %s", ErrTemplateGone, forkAnswerTimeout)
		t.fail(err)
		return templateAnswer{}, err
	}
}
