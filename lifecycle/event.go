package lifecycle

import "time"

// Kinds of lifecycle event; they end the subject pyfleet.evt.<pool>.<node>.<kind>.
const (
	KindNodeStarted  = "node_started"
	KindNodeStopping = "node_stopping"
	KindNodeStopped  = "node_stopped"
	KindSpawned      = "spawned"
	KindReady        = "ready"
	KindSpawnFailed  = "spawn_failed"
	KindTerminated   = "terminated"
	KindCrashed      = "crashed"
	KindRestarted    = "restarted"
	KindOrphanReaped = "orphan_reaped"
	KindCrashLoop    = "crash_loop"
)

// Reasons a worker is terminated on purpose.
const (
	ReasonStop      = "stop"
	ReasonRecycle   = "recycle"
	ReasonDeadline  = "deadline"
	ReasonUnhealthy = "unhealthy"
	// ReasonChannelLost: the worker's gRPC stream to the node broke while
	// its process lived, so it could serve no call.
	ReasonChannelLost = "channel_lost"
	// ReasonOOM: the kernel's OOM killer ended the worker's tree, which
	// passed its memory limit (--worker-memory-limit).
	ReasonOOM = "oom"
)

// Event is one thing that happened to a node or a process it owns. The JSON
// form is the body of the event message (docs/protocol.md, "Events"); empty fields are
// left out.
type Event struct {
	Kind     string    `json:"kind"`
	TS       time.Time `json:"ts"`
	Pool     string    `json:"pool,omitempty"`
	Node     string    `json:"node,omitempty"`
	Run      string    `json:"run,omitempty"`
	Worker   string    `json:"worker,omitempty"`
	PID      int       `json:"pid,omitempty"`
	PGID     int       `json:"pgid,omitempty"`
	Reason   string    `json:"reason,omitempty"`
	ExitCode *int      `json:"exit_code,omitempty"`
	Signal   string    `json:"signal,omitempty"`
	Detail   string    `json:"detail,omitempty"`
}

// Events receives lifecycle events. It must not block for long: it is called
// from the goroutines that supervise processes.
type Events func(Event)
