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
	f       *os.File
	path    string
	release sync.Once
	err     error
}

func nodesDir(stateDir string) string { return filepath.Join(stateDir, "nodes") }

func lockPath(stateDir, node, run string) string {
	return filepath.Join(nodesDir(stateDir), node+"."+run+lockSuffix)
}

// AcquireNodeLock takes the lock of run run of node node. Take it before
// anything else a run does, so that no process or registry record of the run
// can exist while the run looks dead.
func AcquireNodeLock(stateDir, node, run string) (*NodeLock, error) {
	if !validName(node) || !validName(run) {
		return nil, fmt.Errorf("%w: node %q, run %q", ErrInvalidName, node, run)
	}
	if err := os.MkdirAll(nodesDir(stateDir), 0o700); err != nil {
		return nil, fmt.Errorf("lifecycle: node lock: %w", err)
	}
	path := lockPath(stateDir, node, run)
	// The file appears under its name already locked (locked under a
	// temporary name, then linked): a lock file that exists unlocked is a
	// tombstone, and a Reaper finding a starting node's file unlocked would
	// take the run for dead. os.CreateTemp sets O_CLOEXEC, as it must: a
	// worker that inherited this descriptor would hold the lock after the
	// node died and make it look alive.
	f, err := os.CreateTemp(nodesDir(stateDir), "."+node+"."+run+".*.tmp")
	if err != nil {
		return nil, fmt.Errorf("lifecycle: node lock: %w", err)
	}
	defer os.Remove(f.Name())
	if err := flock(f, unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("lifecycle: node lock %s: %w", f.Name(), err)
	}
	if err := os.Link(f.Name(), path); err != nil {
		f.Close()
		if errors.Is(err, fs.ErrExist) {
			return nil, fmt.Errorf("%w: %s exists", ErrRunTaken, path)
		}
		return nil, fmt.Errorf("lifecycle: node lock: %w", err)
	}
	return &NodeLock{f: f, path: path}, nil
}

// Release ends the run: it removes the lock file and drops the lock. Call it
// last, after every worker of the run has been stopped and its record
// deleted; a run that ends without Release (a crash) leaves a tombstone for
// the Reaper instead. Release is idempotent.
func (l *NodeLock) Release() error {
	l.release.Do(func() {
		// Removed while still locked, so a Reaper cannot find the run dead
		// and sweep it in between.
		err := os.Remove(l.path)
		if errors.Is(err, fs.ErrNotExist) {
			err = nil
		}
		l.err = errors.Join(err, l.f.Close())
	})
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
