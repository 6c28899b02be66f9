package lifecycle

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pyfleet/pyfleet/lifecycle/pidinit"
)

// pidnsContainment is ModePIDNS: each worker runs under an init (package
// pidinit: bin/pyfleet-init, or the node's binary re-executed with InitArg)
// that is PID 1 of a new PID namespace. When the init dies, however it dies (its worker exited, the
// node killed it, its parent-death signal fired), the kernel SIGKILLs every
// other process in the namespace, and nothing can leave a PID namespace:
// setsid, double forks and a clean environment change nothing.
type pidnsContainment struct {
	exe    string // the init's binary (pidinitBinary)
	parent string // this process's pid as /proc numbers it
	root   bool   // no user namespace needed
}

// NewPIDNSContainment returns ModePIDNS's Containment for run m, after one
// probe that the host allows it: an init started the way Prepare starts
// one, which sets its namespaces up and exits. As root only the PID and
// mount namespaces are new; otherwise a user namespace maps this process's
// uid and gid to themselves. The error wraps ErrContainmentUnavailable and
// says why when the host refuses (user namespaces disabled or limited to
// zero, a seccomp filter, an AppArmor restriction on unprivileged user
// namespaces, a /proc that cannot be mounted).
func NewPIDNSContainment(m Marker) (Containment, error) {
	_ = m // one namespace per worker start: nothing is kept per run
	exe, err := pidinitBinary()
	if err != nil {
		return nil, fmt.Errorf("%w: pidns: %w", ErrContainmentUnavailable, err)
	}
	parent, err := os.Readlink("/proc/self")
	if err != nil {
		return nil, fmt.Errorf("%w: pidns: %w", ErrContainmentUnavailable, err)
	}
	c := &pidnsContainment{exe: exe, parent: parent, root: os.Geteuid() == 0}
	if err := c.probe(); err != nil {
		return nil, fmt.Errorf("%w: pidns: %w", ErrContainmentUnavailable, err)
	}
	return c, nil
}

func (c *pidnsContainment) Mode() string { return ModePIDNS }

// InitBinaryName is the init's own binary, looked for beside the node's.
const InitBinaryName = "pyfleet-init"

// pidinitBinary is the binary to start as each worker's init:
// InitBinaryName beside this process's binary, else this binary itself
// (which must then hand InitArg over to InitMain). The dedicated one links
// only package pidinit and starts in about a millisecond; the node's binary
// runs every package's initialisation first (gRPC, NATS, protobuf
// registries), which costs several milliseconds per worker start
// (docs/benchmarks.md).
func pidinitBinary() (string, error) {
	exe, err := os.Executable()
	if err != nil {
		return "", fmt.Errorf("the node's binary: %w", err)
	}
	beside := filepath.Join(filepath.Dir(exe), InitBinaryName)
	if st, err := os.Stat(beside); err == nil && st.Mode().IsRegular() && unix.Access(beside, unix.X_OK) == nil {
		return beside, nil
	}
	return exe, nil
}

// namespaces sets attr up to start an init: new PID and mount namespaces,
// and without root a user namespace in which the init may mount /proc.
func (c *pidnsContainment) namespaces(attr *syscall.SysProcAttr) {
	attr.Cloneflags |= syscall.CLONE_NEWPID | syscall.CLONE_NEWNS
	if c.root {
		return
	}
	uid, gid := os.Geteuid(), os.Getegid()
	attr.Cloneflags |= syscall.CLONE_NEWUSER
	// The same ids inside as outside: the worker's os.getuid() is the
	// node's, and files it creates are the node's user's.
	attr.UidMappings = []syscall.SysProcIDMap{{ContainerID: uid, HostID: uid, Size: 1}}
	attr.GidMappings = []syscall.SysProcIDMap{{ContainerID: gid, HostID: gid, Size: 1}}
	attr.GidMappingsEnableSetgroups = false // required to map a gid without privilege
	// A non-root exec drops every capability, and the init needs one to
	// mount /proc: the ambient set keeps it through the exec. The init
	// clears it before it forks the worker.
	attr.AmbientCaps = []uintptr{unix.CAP_SYS_ADMIN}
}

// probe starts an init that sets up its namespaces and exits.
func (c *pidnsContainment) probe() error {
	cmd := exec.Command(c.exe, InitArg, pidinit.Probe, c.parent)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	c.namespaces(cmd.SysProcAttr)
	// Not a worker: it must not carry (and so be killed as) one's marks.
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "PYFLEET_WORKER_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("cannot create the namespaces: %w%s", err, userNSHints())
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t := time.NewTimer(10 * time.Second)
	defer t.Stop()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("the init could not set its namespaces up (%w): %s%s", err, strings.TrimSpace(stderr.String()), userNSHints())
		}
		return nil
	case <-t.C:
		_ = cmd.Process.Kill()
		<-done
		return errors.New("the init's probe did not finish within 10 s")
	}
}

// userNSHints names the host settings that commonly refuse the namespaces,
// for an error message. As root only a seccomp filter applies: the others
// are about user namespaces, which root does not use.
func userNSHints() string {
	var hints []string
	read := func(path string) string {
		b, err := os.ReadFile(path)
		if err != nil {
			return ""
		}
		return strings.TrimSpace(string(b))
	}
	if os.Geteuid() != 0 {
		if read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1" {
			hints = append(hints, "AppArmor restricts unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns=1)")
		}
		if read("/proc/sys/kernel/unprivileged_userns_clone") == "0" {
			hints = append(hints, "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone=0)")
		}
		if read("/proc/sys/user/max_user_namespaces") == "0" {
			hints = append(hints, "user namespaces are limited to none (user.max_user_namespaces=0)")
		}
	}
	if read("/proc/sys/user/max_pid_namespaces") == "0" {
		hints = append(hints, "PID namespaces are limited to none (user.max_pid_namespaces=0)")
	}
	if status := read("/proc/self/status"); strings.Contains(status, "\nSeccomp:\t2") {
		hints = append(hints, "a seccomp filter is in force (a container runtime's default profile refuses new namespaces)")
	}
	if len(hints) == 0 {
		return ""
	}
	return "; likely because " + strings.Join(hints, ", ")
}

// Prepare turns cmd into the start of an init that runs cmd as its child:
// same program, argv, environment, working directory and fds (ExtraFiles
// keep their numbers: the init is given one more, the status pipe, after
// them, and does not pass it on). Start's process group and parent-death
// signal apply to the init; so do the pid, pgid and identity the node
// records. cmd.Err (a program not found) is left for Start to return.
func (c *pidnsContainment) Prepare(cmd *exec.Cmd, m Marker) (Container, error) {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	attr := cmd.SysProcAttr
	const ns = syscall.CLONE_NEWPID | syscall.CLONE_NEWNS | syscall.CLONE_NEWUSER
	switch {
	case attr.Cloneflags&ns != 0 || attr.UidMappings != nil || attr.GidMappings != nil:
		return nil, fmt.Errorf("%w: pidns: the command already asks for namespaces", ErrBadCommand)
	case attr.Credential != nil || attr.Chroot != "":
		return nil, fmt.Errorf("%w: pidns: a Credential or Chroot would apply to the init, not to the command", ErrBadCommand)
	}
	// The init would find out only after the fork; without it the fork
	// itself fails. Same error either way.
	if cmd.Err == nil {
		path := cmd.Path
		if !filepath.IsAbs(path) && cmd.Dir != "" {
			path = filepath.Join(cmd.Dir, path)
		}
		if err := unix.Access(path, unix.X_OK); err != nil {
			return nil, &fs.PathError{Op: "exec", Path: cmd.Path, Err: err}
		}
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("lifecycle: pidns: status pipe: %w", err)
	}
	nfiles := len(cmd.ExtraFiles)
	argv := cmd.Args
	if len(argv) == 0 {
		argv = []string{cmd.Path} // what exec.Cmd runs for empty Args
	}
	args := []string{c.exe, InitArg, c.parent, strconv.Itoa(nfiles), strconv.Itoa(3 + nfiles), cmd.Path}
	cmd.Args = append(args, argv...)
	cmd.Path = c.exe
	cmd.ExtraFiles = append(cmd.ExtraFiles[:nfiles:nfiles], w)
	c.namespaces(attr)
	return newPIDNSContainer(r, w), nil
}

// withNamespace adds a worker's namespace to the rest of its container
// (a cgroup, or nothing), as Prepare makes them for a start.
func withNamespace(box Container, ns *pidnsContainer) Container {
	if cg, ok := box.(*cgroupContainer); ok {
		return &namespacedCgroup{cgroupContainer: cg, pidnsContainer: ns}
	}
	return ns
}

// pidnsContainer is one worker start's namespace. Its init writes the
// command's wait status on the status pipe when the command ends, then
// waits to be killed (see pidinit.Main): CommandEnded lets Start report and
// kill the command's marked leftovers while they still run, then kill the
// init, whose death the kernel makes the end of everything else in the
// namespace.
type pidnsContainer struct {
	status *os.File // the read end of the init's status pipe
	w      *os.File // its write end, held until the init is reaped (the init has its own copy)

	ended   chan struct{} // closed once readStatus has read the status, or EOF
	stopped chan struct{} // closed when readStatus returns
	got     []byte        // what the init wrote, valid once ended is closed
	closeW  sync.Once
}

func newPIDNSContainer(r, w *os.File) *pidnsContainer {
	c := &pidnsContainer{status: r, w: w, ended: make(chan struct{}), stopped: make(chan struct{})}
	go c.readStatus()
	return c
}

// readStatus reads the init's one line. It returns at the line, at EOF (the
// init and the node's write end are both closed), or when Release closes
// the read end.
func (c *pidnsContainer) readStatus() {
	defer close(c.stopped)
	defer close(c.ended)
	buf := make([]byte, 32)
	for n := 0; n < len(buf); {
		m, err := c.status.Read(buf[n:])
		n += m
		if bytes.IndexByte(buf[:n], '\n') >= 0 || err != nil {
			c.got = buf[:n]
			return
		}
	}
}

// CommandEnded is closed when the command the init ran has ended (or the
// init is gone without saying).
func (c *pidnsContainer) CommandEnded() <-chan struct{} { return c.ended }

// Kill does nothing: Start kills the init, the leader, and the kernel the
// rest of the namespace with it.
func (*pidnsContainer) Kill() error { return nil }

func (c *pidnsContainer) Release() error {
	c.closeW.Do(func() { _ = c.w.Close() })
	err := c.status.Close()
	<-c.stopped
	return err
}

// Exit returns how the command ended, as its init wrote it, or the init's
// own status if it wrote none (it was killed first: SIGKILL from Stop, its
// parent-death signal; or it never started the command). Start calls it
// once the init is reaped, when no one else can write to the pipe: closing
// the node's write end makes the read end at EOF at the latest.
func (c *pidnsContainer) Exit(leader ExitStatus) ExitStatus {
	c.closeW.Do(func() { _ = c.w.Close() })
	<-c.ended
	v, err := strconv.ParseUint(strings.TrimSpace(string(c.got)), 10, 32)
	if err != nil {
		return leader
	}
	ws := syscall.WaitStatus(v)
	switch {
	case ws.Signaled():
		return ExitStatus{Code: -1, Signal: unix.SignalName(ws.Signal())}
	case ws.Exited():
		return ExitStatus{Code: ws.ExitStatus()}
	}
	return leader
}
