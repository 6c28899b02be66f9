package pool

import (
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/pyfleet/pyfleet/lifecycle"
)

// WorkerDetail is one live worker as the node's status endpoint shows it
// (docs/protocol.md, "Node status").
type WorkerDetail struct {
	Name string `json:"name"`
	// PID is the host pid of the interpreter (lifecycle.WorkerPID), Root
	// the process the node started (its PID namespace's init, or the same).
	PID     int       `json:"pid"`
	Root    int       `json:"root_pid"`
	State   string    `json:"state"` // "idle", "busy" or "retiring"
	Started time.Time `json:"started"`
	Handled uint64    `json:"handled"`
	Running int64     `json:"running"`
}

// ErrNoWorker is returned by Recycle for a name no live worker has.
var ErrNoWorker = errors.New("no such worker")

// Details lists the live workers, by name.
func (p *Pool) Details() []WorkerDetail {
	p.mu.Lock()
	ws := make([]*worker, 0, len(p.workers))
	for _, w := range p.workers {
		ws = append(ws, w)
	}
	p.mu.Unlock()
	out := make([]WorkerDetail, 0, len(ws))
	for _, w := range ws {
		d := WorkerDetail{
			Name: w.name, Root: w.proc.PID(), Started: w.started,
			Handled: w.handled.Load(), Running: w.inflight.Load(), State: "idle",
		}
		d.PID = lifecycle.WorkerPID(d.Root)
		select {
		case <-w.retire:
			d.State = "retiring"
		default:
			if d.Running > 0 {
				d.State = "busy"
			}
		}
		out = append(out, d)
	}
	slices.SortFunc(out, func(a, b WorkerDetail) int { return compareNames(a.Name, b.Name) })
	return out
}

// compareNames orders "w2" before "w10".
func compareNames(a, b string) int {
	if len(a) != len(b) {
		return len(a) - len(b)
	}
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// Recycle asks for worker name to be replaced as a recycle does: its
// replacement starts first and it finishes its calls, so no call fails.
func (p *Pool) Recycle(name, why string) error {
	p.mu.Lock()
	w := p.workers[name]
	p.mu.Unlock()
	if w == nil {
		return fmt.Errorf("recycle %q: %w", name, ErrNoWorker)
	}
	w.askRecycle(why)
	return nil
}
