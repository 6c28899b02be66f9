package lifecycle

import (
	"bytes"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// InitArg, as the first argument, turns the node's own binary into the init
// of a worker's PID namespace (see NewPIDNSContainment); the binary's main
// must hand over to InitMain when it sees it.
const InitArg = "__pyfleet_init"

// initProbe, as InitMain's only argument, makes the init check that it can
// set its namespace up and exit at once (NewPIDNSContainment's probe).
const initProbe = "probe"

// initForwarded are the signals the init passes on to the worker: the ones
// the node (Process.Stop), an operator or a terminal send to ask something
// of a worker. SIGKILL needs no forwarding: it ends the init, and the
// kernel then kills everything in the namespace.
var initForwarded = []os.Signal{syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGUSR1, syscall.SIGUSR2}

func init() {
	// The parent-death signal and capabilities belong to a thread, not to
	// the process: the kernel sends the signal when the parent of the
	// thread group's leader dies, and a child gets the capabilities of the
	// thread that forked it. Locking the main goroutine to the leader in an
	// init function makes InitMain run there, so what it sets on its thread
	// is what counts. Only an init does this; the node's main is left free.
	if len(os.Args) > 1 && os.Args[1] == InitArg {
		runtime.LockOSThread()
	}
}

// InitMain is the whole life of a worker's init: PID 1 of the worker's own
// PID namespace, started by Start through a Containment of ModePIDNS, whose
// death makes the kernel kill everything else in the namespace. args are
// (after InitArg):
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
// starts the worker in a process group of its own; forwards initForwarded
// to that group; reaps every process that ends up its child; and when the
// worker ends, exits with the worker's exit code (128+n for a death by
// signal n: a namespace's init cannot die of a signal it sends itself, so
// the exact status goes on STATUSFD). It returns the init's exit status.
// With the arguments "probe PARENT" it only sets the namespace up, checks
// /proc/self, and returns 0 if all went well (NewPIDNSContainment's probe).
func InitMain(args []string) int {
	if len(args) == 2 && args[0] == initProbe {
		if err := initSetup(args[1]); err != nil {
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
		fmt.Fprintln(os.Stderr, "usage: "+InitArg+" PARENT NFILES STATUSFD PATH ARG0 [ARG...]")
		return 2
	}
	nfiles, err1 := strconv.Atoi(args[1])
	statusFD, err2 := strconv.Atoi(args[2])
	if err1 != nil || err2 != nil || nfiles < 0 || statusFD < 3+nfiles {
		fmt.Fprintf(os.Stderr, "pyfleet init: bad NFILES %q or STATUSFD %q\n", args[1], args[2])
		return 2
	}
	if err := initSetup(args[0]); err != nil {
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
	signal.Notify(sigs, initForwarded...)
	// On this (the leader's) thread, whose capabilities initSetup dropped:
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
	_, _ = status.WriteString(strconv.FormatUint(uint64(uint32(ws)), 10) + "\n")
	// The exit takes every other process of the namespace along: the
	// kernel SIGKILLs them when the init dies.
	switch {
	case ws.Exited():
		return ws.ExitStatus()
	case ws.Signaled():
		return 128 + int(ws.Signal())
	}
	return 1
}

// initSetup arms the init's parent-death signal, checks its parent is still
// the node, mounts the namespace's /proc and, when the init runs in a user
// namespace of its own, drops the capabilities the mount needed so that
// the worker starts with none, as it would without the namespace.
func initSetup(parent string) error {
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
	stat, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		return err
	}
	end := bytes.LastIndexByte(stat, ')')
	if f := bytes.Fields(stat[end+1:]); end < 0 || len(f) < 2 || string(f[1]) != parent {
		return fmt.Errorf("the node (pid %s) is gone", parent)
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
		// Without root the capability came in the ambient set (Prepare),
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
