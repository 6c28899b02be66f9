package lifecycle

import "errors"

// Errors returned by this package. Callers test for them with errors.Is; the
// returned errors wrap them with the detail (pid, path, name) that went wrong.
var (
	// ErrSpawnerClosed is returned by Start once the Spawner has been closed.
	ErrSpawnerClosed = errors.New("lifecycle: spawner closed")

	// ErrBadCommand is returned by Start for a command it cannot supervise:
	// already started, with Stdout or Stderr already set, or asking for a
	// new session (which would take the child out of its process group).
	ErrBadCommand = errors.New("lifecycle: command cannot be supervised")

	// ErrNoProcess means the process is gone (or never existed).
	ErrNoProcess = errors.New("lifecycle: no such process")

	// ErrBadProcStat means /proc/<pid>/stat did not parse.
	ErrBadProcStat = errors.New("lifecycle: malformed /proc stat")

	// ErrInvalidName is returned for a node, run or worker name that is
	// empty or contains '.', '/' or NUL: names become file names and
	// marker values.
	ErrInvalidName = errors.New("lifecycle: invalid name")

	// ErrRunTaken means the node and run already have a lock file: run
	// names must be new for every start of a node.
	ErrRunTaken = errors.New("lifecycle: run already exists")

	// ErrRegistryBusy means the registry file stayed locked by another
	// process for longer than the registry's timeout.
	ErrRegistryBusy = errors.New("lifecycle: registry busy")

	// ErrNotPrivate means a file of the state dir (the registry, a lock
	// file) is not one only this user can write, so the Reaper cannot
	// trust it (see securePrivateFile).
	ErrNotPrivate = errors.New("lifecycle: state file not private")
)
