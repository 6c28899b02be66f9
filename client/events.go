package client

import (
	"context"
	"encoding/json"
	"fmt"
	"iter"
	"time"

	"github.com/nats-io/nats.go"
)

// Kinds of lifecycle event, the last token of their subject; the node's
// names are in lifecycle/event.go, which the client does not import (it
// would bring the node's logging and storage into every client binary).
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

// EventKinds lists every kind of event, in the order a worker meets them.
func EventKinds() []string {
	return []string{
		KindNodeStarted, KindNodeStopping, KindNodeStopped, KindSpawned, KindReady, KindSpawnFailed,
		KindTerminated, KindCrashed, KindRestarted, KindOrphanReaped, KindCrashLoop,
	}
}

// Event is one lifecycle event of a node or of a process it owns, decoded
// from its JSON body (docs/protocol.md, "Events"). Its fields are
// lifecycle.Event's, in the same order, so one converts to the other.
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

// EventFilter picks events; an empty field matches any value. The zero
// value follows every pool of the client's prefix.
type EventFilter struct {
	Pool, Node, Kind string
}

// EventError is a message on an event subject that is not an event. Events
// yields it and goes on: one bad message must not end a watch.
type EventError struct {
	Subject string
	Data    []byte
	Err     error
}

func (e *EventError) Error() string {
	return fmt.Sprintf("undecodable event on %s: %v", e.Subject, e.Err)
}

func (e *EventError) Unwrap() error { return e.Err }

// EventMsg is an event with the message it came in.
type EventMsg struct {
	Event
	Subject string
	// Data is the body as received.
	Data []byte
}

// Events follows the lifecycle events that f picks, live, by core NATS:
// an event published before the loop starts is not seen (PYFLEET_EVENTS
// keeps 24 hours of them for whoever needs the past). The sequence ends,
// without an error, when ctx is done or the loop breaks; a message that is
// not an event is yielded as an *EventError and the sequence goes on; any
// other error ends it.
func (c *Client) Events(ctx context.Context, f EventFilter) iter.Seq2[*EventMsg, error] {
	return func(yield func(*EventMsg, error) bool) {
		tokens := [3]string{"*", "*", "*"}
		for i, v := range []struct{ what, v string }{{"pool", f.Pool}, {"node", f.Node}, {"kind", f.Kind}} {
			if v.v == "" {
				continue
			}
			if err := checkName(v.what, v.v); err != nil {
				yield(nil, err)
				return
			}
			tokens[i] = v.v
		}
		subj := c.subjects.Event(tokens[0], tokens[1], tokens[2])
		sub, err := c.nc.SubscribeSync(subj)
		if err != nil {
			yield(nil, fmt.Errorf("following %s: %w", subj, err))
			return
		}
		defer sub.Unsubscribe()
		// Events come in bursts (a node starting N workers); losing some to
		// the default pending limit would hide exactly the moments worth
		// watching.
		if err := sub.SetPendingLimits(-1, 64<<20); err != nil {
			yield(nil, err)
			return
		}
		for {
			m, err := sub.NextMsgWithContext(ctx)
			switch {
			case ctx.Err() != nil:
				return
			case err == nats.ErrConnectionClosed || err == nats.ErrBadSubscription:
				yield(nil, fmt.Errorf("connection to NATS closed while following %s: %w", subj, nats.ErrConnectionClosed))
				return
			case err != nil:
				yield(nil, fmt.Errorf("following %s: %w", subj, err))
				return
			}
			ev := &EventMsg{Subject: m.Subject, Data: m.Data}
			if err := json.Unmarshal(m.Data, &ev.Event); err != nil {
				if !yield(nil, &EventError{Subject: m.Subject, Data: m.Data, Err: err}) {
					return
				}
				continue
			}
			if !yield(ev, nil) {
				return
			}
		}
	}
}
