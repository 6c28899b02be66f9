package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/protocol"
)

// NodeStatus is a node's answer on its status subject (docs/protocol.md,
// "Node status"): its workers one by one and its functions' recent figures.
type NodeStatus struct {
	Node        string                     `json:"node"`
	Pool        string                     `json:"pool"`
	Run         string                     `json:"run"`
	Version     string                     `json:"version"`
	Containment string                     `json:"containment,omitempty"`
	Started     time.Time                  `json:"started"`
	Draining    bool                       `json:"draining"`
	Jobs        bool                       `json:"jobs"`
	Load        NodeLoad                   `json:"load"`
	Workers     []WorkerStatus             `json:"workers"`
	Functions   map[string]FunctionFigures `json:"functions"`
}

// NodeLoad is a node's pool-wide figures in NodeStatus.
type NodeLoad struct {
	Workers int    `json:"workers"`
	Busy    int    `json:"busy"`
	Queued  int    `json:"queued"`
	Handled uint64 `json:"handled"`
	Errors  uint64 `json:"errors"`
}

// WorkerStatus is one live worker of a node.
type WorkerStatus struct {
	Name      string    `json:"name"`
	PID       int       `json:"pid"`      // the interpreter's, as the host numbers it
	RootPID   int       `json:"root_pid"` // the process the node started (its PID namespace's init, or PID)
	State     string    `json:"state"`    // idle, busy, retiring
	Started   time.Time `json:"started"`
	AgeS      float64   `json:"age_s"`
	Handled   uint64    `json:"handled"`
	Running   int64     `json:"running"`
	RSS       uint64    `json:"rss_bytes"` // the whole tree's; 0 when unread
	LastEvent *Event    `json:"last_event,omitempty"`
}

// FunctionFigures is one function's figures on a node: totals since the
// node started, and the calls of the last WindowS seconds.
type FunctionFigures struct {
	Calls   uint64            `json:"calls"`
	Errors  map[string]uint64 `json:"errors,omitempty"` // by status code
	Recent  int               `json:"recent"`
	WindowS float64           `json:"window_s"`
	Rate    float64           `json:"rate"` // calls per second over the window
	P50Ms   float64           `json:"p50_ms"`
	P99Ms   float64           `json:"p99_ms"`
}

// WithDetail makes Nodes ask every node for its status too and fill
// NodeInfo.Detail (nil for a node that did not answer in time).
func WithDetail() Option { return func(o *options) { o.detail = true } }

// NodeStatuses asks every node of the fleet (every pool, under the client's
// prefix) for its status and returns the answers that arrive within
// DefaultNodesWait, or WithTimeout's duration, or before ctx's deadline.
// Like Nodes it always waits that long.
func (c *Client) NodeStatuses(ctx context.Context, opts ...Option) ([]NodeStatus, error) {
	wait := collect(opts).timeout
	if wait <= 0 {
		wait = DefaultNodesWait
	}
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	return c.collectStatuses(ctx)
}

func (c *Client) collectStatuses(ctx context.Context) ([]NodeStatus, error) {
	ib, err := c.mux.open()
	if err != nil {
		return nil, fmt.Errorf("asking for node status: %w", err)
	}
	defer c.mux.close(ib)
	if err := c.nc.PublishRequest(c.subjects.StatusAll(), ib.subject, nil); err != nil {
		return nil, fmt.Errorf("asking for node status: %w", err)
	}
	var out []NodeStatus
	seen := map[string]bool{}
	for {
		m, err := ib.wait(ctx, nil)
		switch {
		case errors.Is(err, context.DeadlineExceeded):
			return out, nil
		case err != nil && ctx.Err() != nil:
			return nil, ctx.Err()
		case errors.Is(err, errClosed):
			return nil, fmt.Errorf("connection to NATS closed while asking for node status: %w", nats.ErrConnectionClosed)
		case err != nil:
			return nil, err
		case len(m.Data) == 0 && m.Header.Get("Status") == "503":
			return out, nil
		}
		var s NodeStatus
		if json.Unmarshal(m.Data, &s) != nil || s.Node == "" || seen[s.Pool+"."+s.Node] {
			continue
		}
		seen[s.Pool+"."+s.Node] = true
		out = append(out, s)
	}
}

// ControlError is a node's refusal of a control request.
type ControlError struct {
	Node, Verb, Message string
}

func (e *ControlError) Error() string {
	return fmt.Sprintf("node %s refused %s: %s", e.Node, e.Verb, e.Message)
}

// Reload asks node of pool to reload the app as SIGHUP does: a new template
// (--preload), then every worker recycled one at a time, each replacement
// serving before the worker it replaces stops, so no call fails. It returns
// once the reload is done; give ctx the time recycling every worker takes
// (without a deadline: 5 s). by says who asked, for the node's log.
func (c *Client) Reload(ctx context.Context, pool, node, by string) error {
	return c.control(ctx, pool, node, protocol.ControlReload, "", by)
}

// Recycle asks node of pool to replace its worker (a name such as "w3"),
// as --max-requests does: the replacement starts first, no call fails. by
// says who asked, for the node's log.
func (c *Client) Recycle(ctx context.Context, pool, node, worker, by string) error {
	return c.control(ctx, pool, node, protocol.ControlRecycle, worker, by)
}

// Drain asks node of pool to stop as SIGTERM would: no new work, the
// accepted work gets the shutdown grace, then the node exits.
func (c *Client) Drain(ctx context.Context, pool, node, by string) error {
	return c.control(ctx, pool, node, protocol.ControlDrain, "", by)
}

func (c *Client) control(ctx context.Context, pool, node, verb, worker, by string) error {
	if err := checkName("pool", pool); err != nil {
		return err
	}
	if err := checkName("node", node); err != nil {
		return err
	}
	body, _ := json.Marshal(struct {
		Worker string `json:"worker,omitempty"`
		By     string `json:"by,omitempty"`
	}{worker, by})
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
	}
	m, err := c.nc.RequestWithContext(ctx, c.subjects.Control(pool, node, verb), body)
	if errors.Is(err, nats.ErrNoResponders) {
		return localError(503, "NoNode", err, "no node %s in pool %s answers", node, pool)
	}
	if err != nil {
		return fmt.Errorf("%s node %s: %w", verb, node, err)
	}
	var rep struct {
		OK    bool   `json:"ok"`
		Error string `json:"error"`
	}
	if err := json.Unmarshal(m.Data, &rep); err != nil {
		return fmt.Errorf("%s node %s: bad answer: %w", verb, node, err)
	}
	if !rep.OK {
		return &ControlError{Node: node, Verb: verb, Message: rep.Error}
	}
	return nil
}
