package lifecycle

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// A live node proves it is alive by holding an exclusive flock on
// <state-dir>/nodes/<node>.<run>.lock for as long as it runs. The kernel
// drops the lock when the node's process dies, however it dies (SIGKILL
// included), so "the lock can be taken" means "that run is over" with no
// heartbeat, no clock and no pid to trust. A lock file whose run is over is
// a tombstone: it tells the Reaper that marked processes of that run are
// orphans, and the Reaper removes it once nothing of the run is left.

const lockSuffix = ".lock"

// NodeLock is the lock a running node holds.
type NodeLock struct {
	stateDir, node, run string

	mu       sync.Mutex
	f        *os.File // holds the flock; its file is the one at path, unless someone removed it
	path     string
	released bool
	err      error
}

func nodesDir(stateDir string) string { return filepath.Join(stateDir, "nodes") }

func lockPath(stateDir, node, run string) string {
	return filepath.Join(nodesDir(stateDir), node+"."+run+lockSuffix)
}

// AcquireNodeLock takes the lock of run run of node node. Take it before
// anything else a run does, so that no process or registry record of the run
// can exist while the run looks dead. It refuses a state dir whose nodes
// directory holds a file that is not private to this user (ErrNotPrivate):
// the Reaper would act on it.
func AcquireNodeLock(stateDir, node, run string) (*NodeLock, error) {
	if !validName(node) || !validName(run) {
		return nil, fmt.Errorf("%w: node %q, run %q", ErrInvalidName, node, run)
	}
	if err := secureNodeFiles(stateDir); err != nil {
		return nil, err
	}
	path := lockPath(stateDir, node, run)
	f, err := lockedTemp(stateDir, node, run)
	if err != nil {
		return nil, err
	}
	defer os.Remove(f.Name())
	if err := os.Link(f.Name(), path); err != nil {
		f.Close()
		if errors.Is(err, fs.ErrExist) {
			return nil, fmt.Errorf("%w: %s exists", ErrRunTaken, path)
		}
		return nil, fmt.Errorf("lifecycle: node lock: %w", err)
	}
	return &NodeLock{stateDir: stateDir, node: node, run: run, f: f, path: path}, nil
}

// lockedTemp creates a new file beside the lock file, 0600, and locks it.
// The lock file appears under its name already locked (linked or renamed
// from this one): a lock file that exists unlocked is a tombstone, and a
// Reaper finding a starting node's file unlocked would take the run for
// dead. os.CreateTemp sets O_CLOEXEC, as it must: a worker that inherited
// this descriptor would hold the lock after the node died and make it look
// alive.
func lockedTemp(stateDir, node, run string) (*os.File, error) {
	if err := os.MkdirAll(nodesDir(stateDir), 0o700); err != nil {
		return nil, fmt.Errorf("lifecycle: node lock: %w", err)
	}
	f, err := os.CreateTemp(nodesDir(stateDir), "."+node+"."+run+".*.tmp")
	if err != nil {
		return nil, fmt.Errorf("lifecycle: node lock: %w", err)
	}
	if err := flock(f, unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, fmt.Errorf("lifecycle: node lock %s: %w", f.Name(), err)
	}
	return f, nil
}

// Marker names the run the lock belongs to.
func (l *NodeLock) Marker() Marker { return Marker{Node: l.node, Run: l.run} }

// Ensure puts the lock file back if it is gone or is no longer the file
// this run holds locked (someone removed it, a cleaner of old files in /tmp
// did, or a file was put in its place), and reports whether it had to.
// Without its lock file a run still counts as alive for a Reaper that finds
// its records (they name its node process), but NodeAlive says no, and a
// run with no records yet leaves no trace at all. The Reaper of the run
// calls it at every sweep; calling it after Release does nothing.
func (l *NodeLock) Ensure() (bool, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.released {
		return false, nil
	}
	held, err := l.f.Stat()
	if err != nil {
		return false, fmt.Errorf("lifecycle: node lock: %w", err)
	}
	cur, err := os.Lstat(l.path)
	if err == nil && os.SameFile(cur, held) {
		return false, nil
	}
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return false, fmt.Errorf("lifecycle: node lock: %w", err)
	}
	f, err := lockedTemp(l.stateDir, l.node, l.run)
	if err != nil {
		return false, err
	}
	// Rename, not link: whatever took the name is not this run's lock and
	// must go, atomically, so that the name never shows an unlocked file.
	if err := os.Rename(f.Name(), l.path); err != nil {
		f.Close()
		os.Remove(f.Name())
		return false, fmt.Errorf("lifecycle: node lock: %w", err)
	}
	old := l.f
	l.f = f
	old.Close()
	return true, nil
}

// Release ends the run: it removes the lock file and drops the lock. Call it
// last, after every worker of the run has been stopped and its record
// deleted; a run that ends without Release (a crash) leaves a tombstone for
// the Reaper instead. Release is idempotent.
func (l *NodeLock) Release() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.released {
		return l.err
	}
	l.released = true
	// Removed while still locked, so a Reaper cannot find the run dead and
	// sweep it in between. The run's cgroup record goes first: its guardian
	// has removed the cgroup by now.
	cerr := removeCgroupRecord(l.stateDir, l.Marker())
	err := os.Remove(l.path)
	if errors.Is(err, fs.ErrNotExist) {
		err = nil
	}
	l.err = errors.Join(cerr, err, l.f.Close())
	return l.err
}

// NodeAlive reports whether run run of node node is running now: whether
// some process holds its lock.
func NodeAlive(stateDir, node, run string) bool {
	return runStateOf(stateDir, node, run) == runAlive
}

type runState int

const (
	runUnknown runState = iota // no lock file: not a run of this state dir, or one already swept
	runAlive
	runDead
)

func runStateOf(stateDir, node, run string) runState {
	if !validName(node) || !validName(run) {
		return runUnknown
	}
	f, err := os.OpenFile(lockPath(stateDir, node, run), os.O_RDWR, 0)
	if err != nil {
		return runUnknown
	}
	defer f.Close()
	// Our own open file description: flock conflicts with the node's lock
	// even when the node is this very process.
	if err := flock(f, unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return runAlive
	}
	return runDead
}

// removeTombstone removes the lock file of a run that is over, checking
// under the lock that it still is.
func removeTombstone(stateDir, node, run string) error {
	path := lockPath(stateDir, node, run)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil
	}
	defer f.Close()
	if err := flock(f, unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return nil
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("lifecycle: remove %s: %w", path, err)
	}
	return nil
}

// lockedRuns lists the runs that have a lock file in stateDir.
func lockedRuns(stateDir string) ([]Marker, error) {
	entries, err := os.ReadDir(nodesDir(stateDir))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("lifecycle: list node locks: %w", err)
	}
	var runs []Marker
	for _, e := range entries {
		base, ok := strings.CutSuffix(e.Name(), lockSuffix)
		if !ok {
			continue
		}
		// Node names hold no '.', so the first one ends the node.
		if node, run, ok := strings.Cut(base, "."); ok && validName(node) && validName(run) {
			runs = append(runs, Marker{Node: node, Run: run})
		}
	}
	return runs, nil
}

func flock(f *os.File, how int) error {
	for {
		err := unix.Flock(int(f.Fd()), how)
		if err != unix.EINTR {
			return err
		}
	}
}
