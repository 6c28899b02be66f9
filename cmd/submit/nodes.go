package main

import (
	"cmp"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/pyfleet/pyfleet/client"
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

// nodeRow is one line of the table and one element of --json: what the
// node reports, and its uptime when listed.
type nodeRow struct {
	client.NodeInfo
	UptimeS float64 `json:"uptime_s"`
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
	cl, err := a.connect(client.Options{})
	if err != nil {
		return err
	}
	defer cl.Close()
	infos, err := cl.Nodes(ctx, client.WithTimeout(c.wait))
	if err != nil {
		return err
	}
	now := time.Now()
	rows := make([]nodeRow, 0, len(infos))
	for _, n := range infos {
		if c.pool != "" && n.Pool != c.pool {
			continue
		}
		r := nodeRow{NodeInfo: n}
		if !n.Started.IsZero() {
			r.UptimeS = now.Sub(n.Started).Round(time.Second).Seconds()
		}
		rows = append(rows, r)
	}
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
