package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/pyfleet/pyfleet/client"
)

type watchCmd struct {
	pool string
	node string
	kind string
	json bool
}

func (c *watchCmd) flags(fs *flag.FlagSet) {
	fs.StringVar(&c.pool, "pool", "", "only this `POOL` (default: all)")
	fs.StringVar(&c.node, "node", "", "only this `NODE` (default: all)")
	fs.StringVar(&c.kind, "kind", "", "only this `KIND` of event, e.g. crashed (default: all)")
	fs.BoolVar(&c.json, "json", false, "print each event's JSON as received")
}

func (c *watchCmd) run(ctx context.Context, a *app, args []string) error {
	if err := noArgs(args); err != nil {
		return err
	}
	for _, f := range []struct{ flag, v string }{{"--pool", c.pool}, {"--node", c.node}, {"--kind", c.kind}} {
		if f.v == "" {
			continue
		}
		if err := checkToken(f.flag, f.v); err != nil {
			return err
		}
	}
	// A misspelt kind would otherwise wait forever for nothing.
	if c.kind != "" && !slices.Contains(client.EventKinds(), c.kind) {
		return usagef("unknown --kind %q; kinds: %s", c.kind, strings.Join(client.EventKinds(), ", "))
	}

	cl, err := a.connect(client.Options{})
	if err != nil {
		return err
	}
	defer cl.Close()
	// The sequence ends by itself at SIGINT/SIGTERM (ctx), the normal way
	// to stop watching.
	for ev, err := range cl.Events(ctx, client.EventFilter{Pool: c.pool, Node: c.node, Kind: c.kind}) {
		var bad *client.EventError
		switch {
		case errors.As(err, &bad) && c.json:
			err = printJSONEvent(a.stdout, bad.Data)
		case errors.As(err, &bad):
			// One bad message must not end a watch.
			fmt.Fprintf(a.stderr, "submit watch: %v\n", bad)
			continue
		case err != nil:
			return err
		case c.json:
			err = printJSONEvent(a.stdout, ev.Data)
		default:
			_, err = io.WriteString(a.stdout, formatEvent(&ev.Event, c.pool == "")+"\n")
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func printJSONEvent(w io.Writer, data []byte) error {
	var b bytes.Buffer
	if json.Compact(&b, data) != nil {
		b.Reset()
		b.Write(bytes.TrimSpace(data))
	}
	b.WriteByte('\n')
	_, err := w.Write(b.Bytes())
	return err
}

// formatEvent renders an event as one line, e.g.
// "14:03:07.123 node-a/w3 crashed pid=1234 signal=SIGKILL".
func formatEvent(ev *client.Event, showPool bool) string {
	ts := ev.TS
	if ts.IsZero() {
		ts = time.Now()
	}
	var b strings.Builder
	b.WriteString(ts.Local().Format("15:04:05.000"))
	b.WriteByte(' ')
	who := ev.Node
	if who == "" {
		who = "-"
	}
	if ev.Worker != "" {
		who += "/" + ev.Worker
	}
	b.WriteString(who)
	b.WriteByte(' ')
	b.WriteString(ev.Kind)
	field := func(k, v string) {
		if v == "" {
			return
		}
		if strings.ContainsAny(v, " \t\"=") || !strconv.CanBackquote(v) {
			v = strconv.Quote(v)
		}
		fmt.Fprintf(&b, " %s=%s", k, v)
	}
	itoa := func(n int) string {
		if n == 0 {
			return ""
		}
		return strconv.Itoa(n)
	}
	if showPool {
		field("pool", ev.Pool)
	}
	field("pid", itoa(ev.PID))
	field("pgid", itoa(ev.PGID))
	field("reason", ev.Reason)
	if ev.ExitCode != nil {
		field("exit_code", strconv.Itoa(*ev.ExitCode))
	}
	field("signal", ev.Signal)
	field("run", ev.Run)
	field("detail", ev.Detail)
	return b.String()
}
