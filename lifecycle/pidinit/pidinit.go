package pidinit

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Arg, as the first argument, makes a binary the init of a worker's PID
// namespace: bin/pyfleet-init (cmd/pyfleet-init), or any binary linking
// this package whose main hands over to Main when it sees it (poolnode,
// the test binaries that start workers).
const Arg = "__pyfleet_init"

// Probe, as Main's only argument, makes the init check that it can
// set its namespace up and exit at once (lifecycle.NewPIDNSContainment's probe).
const Probe = "probe"

// Adopt, as Main's first argument, makes the init adopt a worker forked
// from a template instead of starting one (see adopt).
const Adopt = "adopt"

// forwarded are the signals the init passes on to the worker: the ones
// the node (Process.Stop), an operator or a terminal send to ask something
// of a worker. SIGKILL needs no forwarding: it ends the init, and the
// kernel then kills everything in the namespace.
var forwarded = []os.Signal{syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGUSR1, syscall.SIGUSR2}

func init() {
	// The parent-death signal and capabilities belong to a thread, not to
	// the process: the kernel sends the signal when the parent of the
	// thread group's leader dies, and a child gets the capabilities of the
	// thread that forked it. Locking the main goroutine to the leader in an
	// init function makes Main run there, so what it sets on its thread
	// is what counts. Only an init does this; the node's main is left free.
	if len(os.Args) > 1 && os.Args[1] == Arg {
		runtime.LockOSThread()
	}
}

// Main is the whole life of a worker's init: PID 1 of the worker's own
// PID namespace, started by lifecycle.Start through a Containment with PID namespaces, whose
// death makes the kernel kill everything else in the namespace. args are
// (after Arg):
//
//	PARENT NFILES STATUSFD PATH ARG0 ARG...
//
// PARENT is the node's pid as the node's /proc numbers it; NFILES how many
// fds from 3 on are the worker's (they keep their numbers); STATUSFD the pipe
// on which the init reports the worker's wait status before it exits; PATH
// and ARG0 ARG... the worker's program and argv. The worker gets the init's
// environment, working directory, stdin, stdout and stderr.
//
// It mounts a /proc of the namespace over /proc (in a mount namespace of its
// own), so that the worker's pid, /proc/self and what psutil reads agree;
// starts the worker in a process group of its own; forwards forwarded
// to that group; reaps every process that ends up its child; and when the
// worker ends, writes the worker's wait status on STATUSFD and waits for the
// node to kill it (the node first reports and kills what the worker left in
// the namespace). It returns only if the status cannot be written, with the
// worker's exit code (128+n for a death by signal n).
// With the arguments "probe PARENT" it only sets the namespace up, checks
// /proc/self, and returns 0 if all went well (lifecycle.NewPIDNSContainment's probe).
// With the arguments "adopt PARENT STATUSFD WORKERPID GOFD GONEFD" it is the init
// of a worker forked from a template, which it did not start (see adopt).
func Main(args []string) int {
	if len(args) > 0 && args[0] == Adopt {
		return adopt(args[1:])
	}
	if len(args) == 2 && args[0] == Probe {
		if err := setup(args[1]); err != nil {
			fmt.Fprintf(os.Stderr, "pyfleet init: %v\n", err)
			return 1
		}
		if self, err := os.Readlink("/proc/self"); err != nil || self != "1" {
			fmt.Fprintf(os.Stderr, "pyfleet init: /proc/self is %q (%v) after mounting the namespace's /proc, want 1\n", self, err)
			return 1
		}
		return 0
	}
	if len(args) < 5 {
		fmt.Fprintln(os.Stderr, "usage: "+Arg+" PARENT NFILES STATUSFD PATH ARG0 [ARG...]")
		return 2
	}
	nfiles, err1 := strconv.Atoi(args[1])
	statusFD, err2 := strconv.Atoi(args[2])
	if err1 != nil || err2 != nil || nfiles < 0 || statusFD < 3+nfiles {
		fmt.Fprintf(os.Stderr, "pyfleet init: bad NFILES %q or STATUSFD %q\n", args[1], args[2])
		return 2
	}
	if err := setup(args[0]); err != nil {
		fmt.Fprintf(os.Stderr, "pyfleet init: %v\n", err)
		return 126
	}
	files := make([]uintptr, 3+nfiles)
	for i := range files {
		files[i] = uintptr(i)
	}
	// The worker gets exactly its own fds: not the status pipe, nor
	// anything else the init holds.
	unix.CloseOnExec(statusFD)

	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, forwarded...)
	// On this (the leader's) thread, whose capabilities setup dropped:
	// the worker is forked from it.
	pid, err := syscall.ForkExec(args[3], args[4:], &syscall.ProcAttr{
		Env:   os.Environ(),
		Files: files,
		Sys:   &syscall.SysProcAttr{Setpgid: true},
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "pyfleet init: start %s: %v\n", args[3], err)
		return 127
	}
	return serve(pid, statusFD, sigs)
}

// adopt is Main's Adopt mode: the init of a worker forked from a template
// (lifecycle's preload.go, python/pyfleet/template.py). The template's
// intermediate unshared the namespaces and forked this process as PID 1 of
// the new PID namespace; this process forked the worker (WORKERPID, as this
// namespace numbers it, blocked until it reads a byte on its end of GOFD)
// and then exec'd this init, which keeps the worker as its child. GONEFD
// is a pipe whose write end only the intermediate holds: it reads EOF when
// the intermediate dies. args are (after Adopt):
//
//	PARENT STATUSFD WORKERPID GOFD GONEFD [ARG0 ARG...]
//
// ARG0 ARG..., the worker's command line, are not used: they show in ps
// what a started init's command line shows.
// The init waits until it has been re-parented to the node (the template
// kills the intermediate once the node has registered this process as its
// child), sets up as a started init does, lets the worker go, and then
// lives as one: forwards signals, reaps, reports the worker's status on
// STATUSFD and waits to be killed.
func adopt(args []string) int {
	if len(args) < 5 {
		fmt.Fprintln(os.Stderr, "usage: "+Arg+" "+Adopt+" PARENT STATUSFD WORKERPID GOFD GONEFD [ARG0 ARG...]")
		return 2
	}
	statusFD, err1 := strconv.Atoi(args[1])
	pid, err2 := strconv.Atoi(args[2])
	goFD, err3 := strconv.Atoi(args[3])
	goneFD, err4 := strconv.Atoi(args[4])
	if err1 != nil || err2 != nil || err3 != nil || err4 != nil || statusFD < 3 || goFD < 3 || goneFD < 3 || pid <= 1 {
		fmt.Fprintf(os.Stderr, "pyfleet init: bad STATUSFD %q, WORKERPID %q, GOFD %q or GONEFD %q\n", args[1], args[2], args[3], args[4])
		return 2
	}
	unix.CloseOnExec(statusFD)
	unix.CloseOnExec(goFD)
	err := waitAdopted(args[0], goneFD, adoptTimeout)
	_ = unix.Close(goneFD)
	if err != nil {
		fmt.Fprintf(os.Stderr, "pyfleet init: %v\n", err)
		return 126
	}
	if err := setup(args[0]); err != nil {
		fmt.Fprintf(os.Stderr, "pyfleet init: %v\n", err)
		return 126
	}
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, forwarded...)
	// The worker runs no code of the app before this byte: by then the
	// init is the node's child, dies with it, and /proc is the namespace's.
	if _, err := unix.Write(goFD, []byte{1}); err != nil {
		fmt.Fprintf(os.Stderr, "pyfleet init: release the worker: %v\n", err)
		return 126
	}
	_ = unix.Close(goFD)
	return serve(pid, statusFD, sigs)
}

// adoptTimeout bounds adopt's wait to be re-parented to the node: the node
// answers a forked pid within milliseconds, or gives up on it.
const adoptTimeout = 10 * time.Second

// waitAdopted returns once this process's parent is parent, as the node's
// /proc (still mounted here) numbers it; an error once the parent is
// someone else than the intermediate it started under (the node died, or
// gave up on this start), or after limit. It sleeps on gone until the
// intermediate has died; the kernel closes a dying process's files a
// moment before it hands its children to their new parent, and only that
// moment is polled.
func waitAdopted(parent string, gone int, limit time.Duration) error {
	first, err := parentPID()
	if err != nil {
		return err
	}
	deadline := time.Now().Add(limit)
	for {
		fds := []unix.PollFd{{Fd: int32(gone), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, max(0, int(time.Until(deadline).Milliseconds())+1))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("wait for the intermediate's end: %w", err)
		}
		if n == 0 {
			return fmt.Errorf("not re-parented to the node (pid %s) within %s", parent, limit)
		}
		var b [1]byte
		if m, _ := unix.Read(gone, b[:]); m <= 0 {
			break // EOF: the intermediate is dying
		}
	}
	for pause := 20 * time.Microsecond; ; pause = min(2*pause, time.Millisecond) {
		now, err := parentPID()
		switch {
		case err != nil:
			return err
		case now == parent:
			return nil
		case now != first:
			return fmt.Errorf("re-parented to %s, not to the node (pid %s)", now, parent)
		case time.Now().After(deadline):
			return fmt.Errorf("not re-parented to the node (pid %s) within %s", parent, limit)
		}
		time.Sleep(pause)
	}
}

// ownMountNamespace reports whether this process's mount namespace is
// another than that of parent (its pid as the node's /proc numbers it).
func ownMountNamespace(parent string) (bool, error) {
	mine, err := os.Readlink("/proc/self/ns/mnt")
	if err != nil {
		return false, err
	}
	theirs, err := os.Readlink("/proc/" + parent + "/ns/mnt")
	if err != nil {
		return false, err
	}
	return mine != theirs, nil
}

// parentPID is this process's parent as the /proc mounted at /proc numbers
// it (getppid says 0 for a parent outside the PID namespace).
func parentPID() (string, error) {
	stat, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		return "", err
	}
	end := bytes.LastIndexByte(stat, ')')
	f := bytes.Fields(stat[end+1:])
	if end < 0 || len(f) < 2 {
		return "", fmt.Errorf("cannot parse /proc/self/stat %q", stat)
	}
	return string(f[1]), nil
}

// serve is the init's life once the worker (pid, its child) runs:
// forwarding sigs to it, reaping every child, and reporting the worker's
// wait status on statusFD.
func serve(pid, statusFD int, sigs chan os.Signal) int {
	go func() {
		for sig := range sigs {
			// The node signals a worker's whole group; so does its init.
			// The group id is safe to use: its leader is the init's child,
			// not reaped until the loop below sees it exit, and then the
			// init exits without forwarding more.
			s := sig.(syscall.Signal)
			_ = syscall.Kill(-pid, s)
			if pg, err := syscall.Getpgid(pid); err == nil && pg != pid {
				_ = syscall.Kill(pid, s)
			}
		}
	}()

	// Every process of the namespace whose parent dies becomes the init's
	// child; waiting for any child reaps them all. It cannot take the exit
	// status of a child of the worker: only a process's own children can
	// be waited for, and the worker's children stay the worker's.
	var ws syscall.WaitStatus
	for {
		var st syscall.WaitStatus
		got, err := syscall.Wait4(-1, &st, 0, nil)
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "pyfleet init: wait: %v\n", err)
			return 1
		}
		if got == pid {
			ws = st
			break
		}
	}
	signal.Stop(sigs)
	status := os.NewFile(uintptr(statusFD), "status")
	if _, err := status.WriteString(strconv.FormatUint(uint64(uint32(ws)), 10) + "\n"); err == nil {
		// The node kills this init once it has named and killed, with an
		// event each, the worker's marked leftovers, which still run in
		// the namespace: the exit would kill them unreported. Meanwhile
		// orphans are still reaped; the parent-death signal still ends
		// everything if the node dies first.
		for {
			if _, err := syscall.Wait4(-1, nil, 0, nil); err == syscall.ECHILD {
				time.Sleep(time.Hour)
			}
		}
	}
	// No node reads the status: the exit takes every other process of the
	// namespace along (the kernel SIGKILLs them when the init dies).
	switch {
	case ws.Exited():
		return ws.ExitStatus()
	case ws.Signaled():
		return 128 + int(ws.Signal())
	}
	return 1
}

// setup arms the init's parent-death signal, checks its parent is still
// the node, mounts the namespace's /proc and, when the init runs in a user
// namespace of its own, drops the capabilities the mount needed so that
// the worker starts with none, as it would without the namespace.
func setup(parent string) error {
	if unix.Gettid() != unix.Getpid() {
		return fmt.Errorf("not on the main thread (tid %d, pid %d)", unix.Gettid(), unix.Getpid())
	}
	if err := unix.Prctl(unix.PR_SET_PDEATHSIG, uintptr(unix.SIGKILL), 0, 0, 0); err != nil {
		return fmt.Errorf("set the parent-death signal: %w", err)
	}
	// The parent is outside the namespace (getppid says 0), so it is read
	// from the /proc the init still shares with the node, which numbers it
	// as the node's own /proc does. A different parent means the node died
	// before the signal was armed.
	if now, err := parentPID(); err != nil || now != parent {
		return fmt.Errorf("the node (pid %s) is gone (%v)", parent, err)
	}
	// The mounts below are the worker's own only in a mount namespace the
	// node's start (or the template's intermediate) made for this init. In
	// the node's they would stack a /proc over the host's and make the
	// host's / private, for every process on it, on each worker start.
	switch own, err := ownMountNamespace(parent); {
	case errors.Is(err, fs.ErrPermission):
		// Only an init in a user namespace of its own (a node without
		// root) is denied the node's link, and it holds no privilege
		// over the node's mount namespace: a mount there would fail.
	case err != nil:
		return fmt.Errorf("compare the mount namespace with the node's: %w", err)
	case !own:
		return errors.New("not in a mount namespace of its own (it is the node's): refusing to mount /proc over the host's")
	}
	// Private first: the new mount namespace is a copy of the node's, and
	// a mount under a shared / would propagate back to the host's /proc.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make / private in the mount namespace: %w", err)
	}
	if err := unix.Mount("proc", "/proc", "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("mount the PID namespace's /proc: %w", err)
	}
	if os.Getuid() != 0 {
		// Without root the capability came in the ambient set (lifecycle's pidnsContainment.Prepare),
		// which a non-root exec keeps: clear it, and the rest with it, on
		// the thread that forks the worker. The runtime's other threads
		// keep theirs (with cgo linked in, no call reaches every thread),
		// but only in this user namespace, which the node's user could
		// create for itself anyway.
		if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil {
			return fmt.Errorf("clear ambient capabilities: %w", err)
		}
		hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
		var data [2]unix.CapUserData
		if err := unix.Capset(&hdr, &data[0]); err != nil {
			return fmt.Errorf("drop capabilities: %w", err)
		}
	}
	return nil
}
