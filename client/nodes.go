package client

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/pyfleet/pyfleet/protocol"
)

// NodeInfo is one live node as its micro service STATS describe it
// (docs/protocol.md, "Micro service"). Figures the node did not report are
// nil, not a misleading 0.
type NodeInfo struct {
	Node    string `json:"node"`
	Pool    string `json:"pool"`
	ID      string `json:"id"` // the micro service instance
	Version string `json:"version,omitempty"`
	// Containment is the mode that keeps the node's workers' trees
	// (cgroup, pidns, group); empty for a node that does not say.
	Containment string    `json:"containment,omitempty"`
	Workers     *int      `json:"workers"`
	Busy        *int      `json:"busy"`
	Queued      *int      `json:"queued"`
	Handled     *int      `json:"handled"`
	Errors      *int      `json:"errors"`
	Started     time.Time `json:"started"`
	// Detail is the node's status (WithDetail); nil without it or when
	// the node did not answer in time.
	Detail *NodeStatus `json:"detail,omitempty"`
}

// nodeLoad is the node-wide figures a node reports in its endpoints' stats
// data, either as the whole data object or under its "node" key (what bus
// does, beside per-endpoint counters).
type nodeLoad struct {
	Workers *int `json:"workers"`
	Busy    *int `json:"busy"`
	Queued  *int `json:"queued"`
	Handled *int `json:"handled"`
	Errors  *int `json:"errors"`
}

// endpointData is the rest of bus's per-endpoint data: its own counters,
// which unlike micro's num_errors count errors answered after the handler
// returned.
type endpointData struct {
	Node      *nodeLoad `json:"node"`
	Completed *int      `json:"completed"`
	Errors    *int      `json:"errors"`
}

// Nodes asks every node of the fleet (every pool, under the client's
// prefix) for its STATS and returns those that answer within
// DefaultNodesWait, or WithTimeout's duration, or before ctx's deadline if
// that comes first, ordered by pool and node. NATS cannot tell when all
// have answered, so Nodes always waits that long. No node answering is not
// an error: the list is empty.
func (c *Client) Nodes(ctx context.Context, opts ...Option) ([]NodeInfo, error) {
	o := collect(opts)
	wait := o.timeout
	if wait <= 0 {
		wait = DefaultNodesWait
	}
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	var statuses []NodeStatus
	var statusErr error
	done := make(chan struct{})
	if o.detail {
		// Both questions share the one wait.
		go func() {
			defer close(done)
			statuses, statusErr = c.collectStatuses(ctx)
		}()
	} else {
		close(done)
	}
	stats, err := c.collectStats(ctx)
	<-done
	if err == nil {
		err = statusErr
	}
	if err != nil {
		return nil, err
	}
	nodes := make([]NodeInfo, 0, len(stats))
	for _, s := range stats {
		if p := s.Metadata[protocol.MetaPrefix]; p != "" && p != c.subjects.Root() {
			continue // a fleet under another prefix shares the service name
		}
		nodes = append(nodes, toNodeInfo(s))
	}
	for i := range nodes {
		for j := range statuses {
			if statuses[j].Node == nodes[i].Node && statuses[j].Pool == nodes[i].Pool {
				nodes[i].Detail = &statuses[j]
			}
		}
	}
	slices.SortFunc(nodes, func(x, y NodeInfo) int {
		return cmp.Or(cmp.Compare(x.Pool, y.Pool), cmp.Compare(x.Node, y.Node), cmp.Compare(x.ID, y.ID))
	})
	return nodes, nil
}

// collectStats asks every instance of the service for its stats and gathers
// the answers that arrive before ctx's deadline.
func (c *Client) collectStats(ctx context.Context) ([]micro.Stats, error) {
	var out []micro.Stats
	err := c.collectService(ctx, micro.StatsVerb, "node stats", func(data []byte) string {
		var s micro.Stats
		if json.Unmarshal(data, &s) != nil || s.ID == "" {
			return ""
		}
		out = append(out, s)
		return s.ID
	})
	return out, err
}

// collectService sends verb to every instance of the service and hands each
// answer that arrives before ctx's deadline to take, which returns the
// instance's id, or "" for an answer it did not keep; an instance answers
// once per subscription it has, and only its first answer is taken.
func (c *Client) collectService(ctx context.Context, verb micro.Verb, what string, take func([]byte) string) error {
	subj, err := micro.ControlSubject(verb, protocol.ServiceName, "")
	if err != nil {
		return err
	}
	ib, err := c.mux.open()
	if err != nil {
		return fmt.Errorf("asking for %s: %w", what, err)
	}
	defer c.mux.close(ib)
	if err := c.nc.PublishRequest(subj, ib.subject, nil); err != nil {
		return fmt.Errorf("asking for %s: %w", what, err)
	}
	seen := map[string]bool{}
	for {
		m, err := ib.wait(ctx, nil)
		switch {
		case errors.Is(err, context.DeadlineExceeded):
			return nil
		case err != nil && ctx.Err() != nil:
			return ctx.Err()
		case errors.Is(err, errClosed):
			return fmt.Errorf("connection to NATS closed while asking for %s: %w", what, nats.ErrConnectionClosed)
		case err != nil:
			return err
		case len(m.Data) == 0 && m.Header.Get("Status") == "503":
			return nil // no responders: no node at all
		}
		var id struct {
			ID string `json:"id"`
		}
		if json.Unmarshal(m.Data, &id) != nil || id.ID == "" || seen[id.ID] {
			continue
		}
		if take(m.Data) != "" {
			seen[id.ID] = true
		}
	}
}

func toNodeInfo(s micro.Stats) NodeInfo {
	r := NodeInfo{
		Node:        cmp.Or(s.Metadata[protocol.MetaNode], s.ID),
		Pool:        s.Metadata[protocol.MetaPool],
		ID:          s.ID,
		Version:     s.Version,
		Containment: s.Metadata[protocol.MetaContainment],
		Started:     s.Started,
	}
	// Every endpoint may carry the same node-wide figures: take one, never
	// add them up.
	for _, e := range s.Endpoints {
		if l := loadOf(e.Data); l != nil {
			r.Workers, r.Busy, r.Queued, r.Handled, r.Errors = l.Workers, l.Busy, l.Queued, l.Handled, l.Errors
			return r
		}
	}
	var handled, errs int
	for _, e := range s.Endpoints {
		var d endpointData
		if json.Unmarshal(e.Data, &d) == nil && d.Completed != nil && d.Errors != nil {
			handled += *d.Completed
			errs += *d.Errors
			continue
		}
		handled += e.NumRequests
		errs += e.NumErrors
	}
	r.Handled, r.Errors = &handled, &errs
	return r
}

func loadOf(data json.RawMessage) *nodeLoad {
	if len(data) == 0 {
		return nil
	}
	var d endpointData
	if json.Unmarshal(data, &d) == nil && d.Node != nil && d.Node.Workers != nil {
		return d.Node
	}
	var l nodeLoad
	if json.Unmarshal(data, &l) == nil && l.Workers != nil {
		return &l
	}
	return nil
}
