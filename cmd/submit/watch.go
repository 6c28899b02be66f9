package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/lifecycle"
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

var eventKinds = []string{
	lifecycle.KindNodeStarted, lifecycle.KindNodeStopping, lifecycle.KindNodeStopped,
	lifecycle.KindSpawned, lifecycle.KindReady, lifecycle.KindSpawnFailed,
	lifecycle.KindTerminated, lifecycle.KindCrashed, lifecycle.KindRestarted,
	lifecycle.KindOrphanReaped, lifecycle.KindCrashLoop,
}

func (c *watchCmd) run(ctx context.Context, a *app, args []string) error {
	if err := noArgs(args); err != nil {
		return err
	}
	tokens := make([]string, 3)
	for i, f := range []struct{ flag, v string }{{"--pool", c.pool}, {"--node", c.node}, {"--kind", c.kind}} {
		tokens[i] = "*"
		if f.v == "" {
			continue
		}
		if err := checkToken(f.flag, f.v); err != nil {
			return err
		}
		tokens[i] = f.v
	}
	// A misspelt kind would otherwise wait forever for nothing.
	if c.kind != "" && !slices.Contains(eventKinds, c.kind) {
		return usagef("unknown --kind %q; kinds: %s", c.kind, strings.Join(eventKinds, ", "))
	}

	nc, err := a.connect()
	if err != nil {
		return err
	}
	defer nc.Close()
	subj := a.subjects().Event(tokens[0], tokens[1], tokens[2])
	sub, err := nc.SubscribeSync(subj)
	if err != nil {
		return err
	}
	defer sub.Unsubscribe()
	// Events come in bursts (a node starting N workers); losing some to the
	// default pending limit would hide exactly the moments worth watching.
	if err := sub.SetPendingLimits(-1, 64<<20); err != nil {
		return err
	}
	for {
		m, err := sub.NextMsgWithContext(ctx)
		switch {
		case ctx.Err() != nil:
			return nil // SIGINT/SIGTERM: the normal way to stop watching
		case isClosed(err):
			return unavailablef("connection to NATS closed")
		case err != nil:
			return fmt.Errorf("watching %s: %w", subj, err)
		}
		if c.json {
			err = printJSONEvent(a.stdout, m.Data)
		} else {
			err = c.printEvent(a, m)
		}
		if err != nil {
			return err
		}
	}
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

func (c *watchCmd) printEvent(a *app, m *nats.Msg) error {
	var ev lifecycle.Event
	if err := json.Unmarshal(m.Data, &ev); err != nil {
		// One bad message must not end a watch.
		fmt.Fprintf(a.stderr, "submit watch: undecodable event on %s: %v\n", m.Subject, err)
		return nil
	}
	_, err := io.WriteString(a.stdout, formatEvent(&ev, c.pool == "")+"\n")
	return err
}

// formatEvent renders an event as one line, e.g.
// "14:03:07.123 node-a/w3 crashed pid=1234 signal=SIGKILL".
func formatEvent(ev *lifecycle.Event, showPool bool) string {
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
