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
)
