package node

// The node's status and control endpoints (docs/protocol.md, "Node status"
// and "Node control"): what `submit ui` and Client.Nodes with detail need
// and the micro service's STATS cannot carry (per-worker detail, recent
// per-function latency), and the few operator actions a node takes.

import (
	"encoding/json"
	"errors"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"go.uber.org/zap"

	"github.com/pyfleet/pyfleet/lifecycle"
	"github.com/pyfleet/pyfleet/metrics"
	"github.com/pyfleet/pyfleet/pool"
	"github.com/pyfleet/pyfleet/protocol"
)

// NodeStatus is the body of a node's answer on its status subject.
type NodeStatus struct {
	Node        string                             `json:"node"`
	Pool        string                             `json:"pool"`
	Run         string                             `json:"run"`
	Version     string                             `json:"version"`
	Containment string                             `json:"containment,omitempty"`
	Started     time.Time                          `json:"started"`
	Draining    bool                               `json:"draining"`
	Jobs        bool                               `json:"jobs"` // whether it runs jobs (JetStream)
	Load        pool.Stats                         `json:"load"`
	Workers     []WorkerStatus                     `json:"workers"`
	Functions   map[string]metrics.FunctionFigures `json:"functions"`
}

// WorkerStatus is one worker in NodeStatus.
type WorkerStatus struct {
	pool.WorkerDetail
	AgeS      float64          `json:"age_s"`
	RSS       uint64           `json:"rss_bytes"` // of its whole tree; 0 when unread
	LastEvent *lifecycle.Event `json:"last_event,omitempty"`
}

// statusState is what the status endpoint keeps between requests.
type statusState struct {
	started time.Time
	window  *metrics.Window
	drainMu sync.Mutex
	drainCh chan struct{} // closed by a drain request
	drained bool

	mu   sync.Mutex
	last map[string]lifecycle.Event // each worker's last event, by worker name
}

func newStatusState() *statusState {
	return &statusState{
		started: time.Now(),
		window:  metrics.NewWindow(time.Minute),
		drainCh: make(chan struct{}),
		last:    map[string]lifecycle.Event{},
	}
}

// track wraps events so that each worker's last event is known; the pool
// names workers ("w3") and reuses a name for the replacement, which is what
// an operator follows.
func (s *statusState) track(next lifecycle.Events) lifecycle.Events {
	return func(e lifecycle.Event) {
		if e.Worker != "" {
			if e.TS.IsZero() {
				e.TS = time.Now().UTC()
			}
			s.mu.Lock()
			s.last[e.Worker] = e
			s.mu.Unlock()
		}
		next(e)
	}
}

func (s *statusState) askDrain() {
	s.drainMu.Lock()
	defer s.drainMu.Unlock()
	if !s.drained {
		s.drained = true
		close(s.drainCh)
	}
}

// serveStatus subscribes the status and control subjects; the
// subscriptions end with the connection's drain or a closer.
func (n *node) serveStatus() error {
	subj := protocol.Subjects{Prefix: n.cfg.Prefix}
	for _, s := range []string{subj.Status(n.cfg.Pool, n.cfg.Node), subj.StatusAll()} {
		sub, err := n.nc.Subscribe(s, n.answerStatus)
		if err != nil {
			return err
		}
		n.onClose(func() { _ = sub.Unsubscribe() })
	}
	ctl, err := n.nc.Subscribe(subj.Control(n.cfg.Pool, n.cfg.Node, "*"), n.control)
	if err != nil {
		return err
	}
	n.onClose(func() {
		_ = ctl.Unsubscribe()
		// This closer runs before the reload loop's (closers run last
		// first): the requests the loop has not taken are refused here
		// rather than run while the node stops; the loop refuses any
		// left when it stops.
		n.refuseReloads("the node is stopping")
	})
	return nil
}

// Status is this node's status now.
func (n *node) Status() NodeStatus {
	s := n.status
	out := NodeStatus{
		Node: n.cfg.Node, Pool: n.cfg.Pool, Run: n.run, Version: Version,
		Containment: n.contain.Mode(), Started: s.started, Jobs: n.jobs != nil,
		Load: n.pool.Stats(), Functions: s.window.Snapshot(),
	}
	out.Draining = n.ready.Load() != nil
	details := n.pool.Details()
	roots := make([]int, len(details))
	for i, d := range details {
		roots[i] = d.Root
	}
	rss, _ := lifecycle.TreeRSSOf(roots) // one scan of /proc for every worker
	now := time.Now()
	s.mu.Lock()
	for _, d := range details {
		w := WorkerStatus{WorkerDetail: d, AgeS: now.Sub(d.Started).Seconds(), RSS: rss[d.Root]}
		if e, ok := s.last[d.Name]; ok {
			w.LastEvent = &e
		}
		out.Workers = append(out.Workers, w)
	}
	s.mu.Unlock()
	if out.Workers == nil {
		out.Workers = []WorkerStatus{}
	}
	return out
}

func (n *node) answerStatus(m *nats.Msg) {
	if m.Reply == "" {
		return
	}
	b, err := json.Marshal(n.Status())
	if err != nil {
		n.log.Warn("status", zap.Error(err))
		return
	}
	_ = m.Respond(b)
}

// ControlRequest is the body of a control request: the worker a recycle
// names, and who asked, for the node's log.
type ControlRequest struct {
	Worker string `json:"worker,omitempty"`
	By     string `json:"by,omitempty"`
}

// ControlReply is the answer to a control request.
type ControlReply struct {
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
}

func (n *node) control(m *nats.Msg) {
	verb := m.Subject[len(m.Subject)-len(lastToken(m.Subject)):]
	var req ControlRequest
	err := json.Unmarshal(m.Data, &req)
	if len(m.Data) == 0 {
		err = nil
	}
	if err == nil {
		n.log.Info("control request", zap.String("verb", verb), zap.String("worker", req.Worker), zap.String("by", req.By))
		switch verb {
		case protocol.ControlRecycle:
			err = n.pool.Recycle(req.Worker, lifecycle.ReasonRecycle)
		case protocol.ControlDrain:
			n.status.askDrain()
		case protocol.ControlReload:
			// Answered by reloadOnHangup once the reload is done, which
			// takes as long as recycling every worker.
			select {
			case n.reloads <- m:
				return
			default:
				err = errors.New("reload: too many reloads waiting already")
			}
		default:
			err = errors.New("unknown control verb " + verb + ": want recycle, drain or reload")
		}
	}
	rep := ControlReply{OK: err == nil}
	if err != nil {
		rep.Error = err.Error()
		n.log.Warn("control request refused", zap.String("verb", verb), zap.String("by", req.By), zap.Error(err))
	}
	respondControl(m, rep)
}

func respondControl(m *nats.Msg, rep ControlReply) {
	if m.Reply != "" {
		b, _ := json.Marshal(rep)
		_ = m.Respond(b)
	}
}

func lastToken(subject string) string {
	for i := len(subject) - 1; i >= 0; i-- {
		if subject[i] == '.' {
			return subject[i+1:]
		}
	}
	return subject
}
