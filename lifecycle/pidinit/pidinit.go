package pidinit

import (
	"bytes"
	"fmt"
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
func Main(args []string) int {
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
