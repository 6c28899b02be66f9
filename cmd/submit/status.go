package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/pyfleet/pyfleet/client"
)

type statusCmd struct {
	pool string
	json bool
}

func (c *statusCmd) flags(fs *flag.FlagSet) {
	fs.StringVar(&c.pool, "pool", "default", "`POOL` of the job")
	fs.BoolVar(&c.json, "json", false, "print the status as stored, one JSON object")
}

func (c *statusCmd) run(ctx context.Context, a *app, args []string) error {
	cl, job, err := a.jobByID(c.pool, args)
	if err != nil {
		return err
	}
	defer cl.Close()
	info, err := job.Info(ctx)
	var ce *client.Error
	if errors.As(err, &ce) && ce.Type == client.TypeNoStatus {
		// Not the fleet's failure: there is nothing to show.
		return errors.New(ce.Message)
	}
	if err != nil {
		return err
	}
	if c.json {
		b, err := json.Marshal(info)
		if err != nil {
			return err
		}
		fmt.Fprintln(a.stdout, string(b))
		return nil
	}
	tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
	row := func(k, v string) {
		if v != "" {
			fmt.Fprintf(tw, "%s\t%s\n", k, v)
		}
	}
	row("job", info.ID)
	row("pool", info.Pool)
	row("function", info.Function)
	row("state", info.State)
	row("attempts", fmt.Sprint(info.Attempts))
	row("node", info.Node)
	row("worker", info.Worker)
	for _, ts := range []struct {
		k string
		t time.Time
	}{{"submitted", info.Submitted}, {"started", info.Started}, {"finished", info.Finished}, {"updated", info.Updated}} {
		if !ts.t.IsZero() {
			row(ts.k, ts.t.Local().Format("2006-01-02 15:04:05.000"))
		}
	}
	if e := info.Error; e != nil {
		row("error", strings.ReplaceAll(fmt.Sprintf("%d %s: %s", e.Code, e.Type, e.Message), "\n", " "))
	}
	if info.Progress != nil {
		row("progress", string(info.Progress))
	}
	return tw.Flush()
}
