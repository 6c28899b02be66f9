package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"slices"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/pyfleet/pyfleet/protocol"
)

type nodesCmd struct {
	pool string
	wait time.Duration
	json bool
}

func (c *nodesCmd) flags(fs *flag.FlagSet) {
	fs.StringVar(&c.pool, "pool", "", "only nodes of this `POOL` (default: all)")
	fs.DurationVar(&c.wait, "wait", 500*time.Millisecond, "how long to collect answers")
	fs.BoolVar(&c.json, "json", false, "print a JSON array")
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

// nodeRow is one line of the table and one element of --json. Figures the
// node did not report are null, not a misleading 0.
type nodeRow struct {
	Node    string `json:"node"`
	Pool    string `json:"pool"`
	ID      string `json:"id"`
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
	UptimeS     float64   `json:"uptime_s"`
}

func (c *nodesCmd) run(ctx context.Context, a *app, args []string) error {
	if err := noArgs(args); err != nil {
		return err
	}
	if c.pool != "" {
		if err := checkToken("--pool", c.pool); err != nil {
			return err
		}
	}
	if c.wait <= 0 {
		return usagef("--wait must be positive")
	}
	nc, err := a.connect()
	if err != nil {
		return err
	}
	defer nc.Close()
	stats, err := collectStats(ctx, nc, c.wait)
	if err != nil {
		return err
	}
	now := time.Now()
	rows := make([]nodeRow, 0, len(stats))
	for _, s := range stats {
		if p := s.Metadata[protocol.MetaPrefix]; p != "" && p != a.prefix {
			continue // a fleet under another prefix shares the service name
		}
		r := toRow(s, now)
		if c.pool == "" || r.Pool == c.pool {
			rows = append(rows, r)
		}
	}
	slices.SortFunc(rows, func(x, y nodeRow) int {
		return cmp.Or(cmp.Compare(x.Pool, y.Pool), cmp.Compare(x.Node, y.Node), cmp.Compare(x.ID, y.ID))
	})
	if c.json {
		b, err := json.MarshalIndent(rows, "", "  ")
		if err != nil {
			return err
		}
		if _, err := a.stdout.Write(append(b, '\n')); err != nil {
			return err
		}
	} else if len(rows) > 0 {
		if err := printNodes(a.stdout, rows); err != nil {
			return err
		}
	}
	if len(rows) == 0 {
		if c.pool != "" {
			return unavailablef("no node of pool %s answered", c.pool)
		}
		return unavailablef("no node answered")
	}
	return nil
}

// collectStats asks every instance of the service for its stats and gathers
// the answers that arrive within wait.
func collectStats(ctx context.Context, nc *nats.Conn, wait time.Duration) ([]micro.Stats, error) {
	subj, err := micro.ControlSubject(micro.StatsVerb, protocol.ServiceName, "")
	if err != nil {
		return nil, err
	}
	sub, err := nc.SubscribeSync(nc.NewInbox())
	if err != nil {
		return nil, err
	}
	defer sub.Unsubscribe()
	if err := nc.PublishRequest(subj, sub.Subject, nil); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeoutCause(ctx, wait, errDeadline)
	defer cancel()
	var out []micro.Stats
	seen := map[string]bool{}
	for {
		m, err := sub.NextMsgWithContext(ctx)
		switch {
		case errors.Is(err, nats.ErrNoResponders), err == nil && isNoResponders(m):
			return out, nil
		case err != nil && errors.Is(context.Cause(ctx), errDeadline):
			return out, nil
		case err != nil && ctx.Err() != nil:
			return nil, errInterrupted
		case isClosed(err):
			return nil, unavailablef("connection to NATS closed")
		case err != nil:
			return nil, err
		}
		var s micro.Stats
		if err := json.Unmarshal(m.Data, &s); err != nil || s.ID == "" || seen[s.ID] {
			continue
		}
		seen[s.ID] = true
		out = append(out, s)
	}
}

func toRow(s micro.Stats, now time.Time) nodeRow {
	r := nodeRow{
		Node:        cmp.Or(s.Metadata[protocol.MetaNode], s.ID),
		Pool:        s.Metadata[protocol.MetaPool],
		ID:          s.ID,
		Version:     s.Version,
		Containment: s.Metadata[protocol.MetaContainment],
		Started:     s.Started,
	}
	if !s.Started.IsZero() {
		r.UptimeS = now.Sub(s.Started).Round(time.Second).Seconds()
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

func printNodes(w io.Writer, rows []nodeRow) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tPOOL\tWORKERS\tBUSY\tQUEUED\tHANDLED\tERRORS\tUPTIME\tCONTAINMENT")
	for _, r := range rows {
		uptime := "-"
		if !r.Started.IsZero() {
			uptime = formatUptime(time.Duration(r.UptimeS) * time.Second)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n",
			r.Node, cmp.Or(r.Pool, "-"), num(r.Workers), num(r.Busy), num(r.Queued),
			num(r.Handled), num(r.Errors), uptime, cmp.Or(r.Containment, "-"))
	}
	return tw.Flush()
}

func num(p *int) string {
	if p == nil {
		return "-"
	}
	return strconv.Itoa(*p)
}

// formatUptime keeps the two largest units: "3d4h", "2h5m", "4m10s", "12s".
func formatUptime(d time.Duration) string {
	d = d.Round(time.Second)
	days := int(d / (24 * time.Hour))
	h := int(d/time.Hour) % 24
	m := int(d/time.Minute) % 60
	s := int(d/time.Second) % 60
	switch {
	case days > 0:
		return fmt.Sprintf("%dd%dh", days, h)
	case h > 0:
		return fmt.Sprintf("%dh%dm", h, m)
	case m > 0:
		return fmt.Sprintf("%dm%ds", m, s)
	}
	return fmt.Sprintf("%ds", s)
}
