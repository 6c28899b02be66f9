package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/pyfleet/pyfleet/client"
)

// schedulesCmd lists, adds and removes recurring schedules
// (client.Schedule); the verb comes first, its flags after it.
type schedulesCmd struct {
	pool       string
	json       bool
	replyTo    string
	jobTimeout time.Duration
}

func (c *schedulesCmd) flags(fs *flag.FlagSet) {
	fs.StringVar(&c.pool, "pool", "default", "`POOL` of the schedules")
	fs.BoolVar(&c.json, "json", false, "list: print each schedule as a JSON line")
	fs.StringVar(&c.replyTo, "reply-to", "", "add: also send each job's result to `SUBJECT`")
	fs.DurationVar(&c.jobTimeout, "job-timeout", 0, "add: each job's deadline from its start (default: the node's --job-timeout)")
}

func (c *schedulesCmd) run(ctx context.Context, a *app, args []string) error {
	verb := "list"
	if len(args) > 0 {
		verb, args = args[0], args[1:]
		// Flags may follow the verb too: `schedules add --pool p ...`.
		fs := flag.NewFlagSet("schedules "+verb, flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		c.flags(fs)
		if err := fs.Parse(args); err != nil {
			return usagef("schedules %s: %v", verb, err)
		}
		args = fs.Args()
	}
	if err := checkToken("--pool", c.pool); err != nil {
		return err
	}
	switch verb {
	case "list":
		if err := noArgs(args); err != nil {
			return err
		}
	case "add":
		if len(args) < 3 || len(args) > 4 {
			return usagef("schedules add: want NAME CRON FUNCTION [JSON|-], got %d arguments (quote the cron)", len(args))
		}
		if err := checkToken("NAME", args[0]); err != nil {
			return err
		}
		if err := checkToken("FUNCTION", args[2]); err != nil {
			return err
		}
	case "remove":
		if len(args) != 1 {
			return usagef("schedules remove: want one NAME, got %d arguments", len(args))
		}
		if err := checkToken("NAME", args[0]); err != nil {
			return err
		}
	default:
		return usagef("schedules: unknown verb %q: want list, add or remove", verb)
	}
	if c.jobTimeout < 0 {
		return usagef("--job-timeout must not be negative")
	}
	var body []byte
	if verb == "add" {
		var err error
		if body, err = payload(args[3:], a.stdin, false); err != nil {
			return err
		}
	}
	cl, err := a.connect(client.Options{Pool: c.pool})
	if err != nil {
		return err
	}
	defer cl.Close()
	switch verb {
	case "add":
		var opts []client.Option
		if c.replyTo != "" {
			opts = append(opts, client.WithReplyTo(c.replyTo))
		}
		if c.jobTimeout > 0 {
			opts = append(opts, client.WithTimeout(c.jobTimeout))
		}
		s, err := cl.Schedule(ctx, args[0], args[1], args[2], json.RawMessage(body), opts...)
		if err != nil {
			return err
		}
		fmt.Fprintf(a.stdout, "scheduled %s: %s (%s) %s\n", s.Name, s.Cron, s.Pattern, s.Function)
		return nil
	case "remove":
		ok, err := cl.Unschedule(ctx, args[0])
		if err != nil {
			return err
		}
		if !ok {
			return fmt.Errorf("no schedule %s in pool %s", args[0], c.pool)
		}
		fmt.Fprintf(a.stdout, "removed %s\n", args[0])
		return nil
	}
	list, err := cl.Schedules(ctx)
	if err != nil {
		return err
	}
	if c.json {
		enc := json.NewEncoder(a.stdout)
		for _, s := range list {
			if err := enc.Encode(s); err != nil {
				return err
			}
		}
		return nil
	}
	tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tCRON\tFUNCTION\tPAYLOAD\tSINCE")
	for _, s := range list {
		p := string(s.Payload)
		if len(p) > 40 {
			p = p[:37] + "..."
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", s.Name, s.Cron, s.Function, p, s.Created.Local().Format(time.DateTime))
	}
	return tw.Flush()
}

// when is the option of job's --delay or --at, nil for neither.
func (c *jobCmd) when() (client.Option, error) {
	switch {
	case c.delay != 0 && c.at != "":
		return nil, usagef("give --delay or --at, not both")
	case c.delay < 0:
		return nil, usagef("--delay %v: want a positive duration", c.delay)
	case c.delay > 0:
		return client.WithDelay(c.delay), nil
	case c.at != "":
		t, err := time.Parse(time.RFC3339, c.at)
		if err != nil {
			return nil, usagef("--at %q: want an RFC 3339 time such as 2030-01-02T15:04:05Z: %v", c.at, err)
		}
		return client.WithAt(t), nil
	}
	return nil, nil
}
