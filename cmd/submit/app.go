package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"sort"
	"strings"
	"sync"
	"text/tabwriter"

	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/client"
	"github.com/pyfleet/pyfleet/protocol"
)

// Exit statuses, as cmd/submit/doc.go states them.
const (
	exitOK          = 0
	exitFailed      = 1 // the function failed, or submit itself did
	exitUsage       = 2
	exitUnavailable = 3   // no node answered, the deadline passed, NATS unreachable
	exitInterrupted = 130 // the shell's convention for SIGINT
)

// app carries what every command shares: the process's streams and the
// global (NATS and prefix) options.
type app struct {
	stdin  io.Reader
	stdout io.Writer
	// stderr is also written from nats.go's callback goroutine (async errors,
	// disconnects), hence the lock.
	stderr    *syncWriter
	stderrTTY bool
	getenv    func(string) string

	conn   connOptions
	prefix string
}

func newApp(stdin io.Reader, stdout, stderr io.Writer, getenv func(string) string) *app {
	a := &app{
		stdin:  stdin,
		stdout: stdout,
		stderr: &syncWriter{w: stderr},
		getenv: getenv,
		prefix: protocol.DefaultPrefix,
	}
	a.conn.fromEnv(getenv)
	return a
}

// runner is one subcommand: it registers its own flags, then runs with the
// positional arguments left after parsing.
type runner interface {
	flags(fs *flag.FlagSet)
	run(ctx context.Context, a *app, args []string) error
}

type command struct {
	name     string
	synopsis string
	summary  string
	detail   string
	new      func() runner
}

var commands = []command{
	{
		name:     "call",
		synopsis: "call [flags] FUNCTION [JSON|-]",
		summary:  "call a function once and print its result",
		detail: `Sends one request to <prefix>.req.<pool>.<function> (or, with --node, to
<prefix>.node.<node>.<pool>.<function>) and prints the result on stdout, one
line per chunk when the function streams. JSON is the argument; "-" reads it
from stdin; none sends null. A failed call prints "code type: message" on
stderr and exits 1; a passed deadline exits 3.`,
		new: func() runner { return &callCmd{} },
	},
	{
		name:     "job",
		synopsis: "job [flags] FUNCTION [JSON|-]",
		summary:  "submit a JetStream job; print its id, or its result with --wait",
		detail: `Publishes a job to <prefix>.job.<pool>.<function> with the job id as
Nats-Msg-Id (a resubmitted id inside the dedup window is dropped, and --wait
then shows the first run's result). Prints the id; with --wait prints the
result instead, read from <prefix>.result.<pool>.<id>, like call.
--job-timeout is the job's deadline from its start (default: the node's
--job-timeout, 1h); --timeout is only how long --wait waits.
--priority high or low publishes to <prefix>.job.<pool>.<function>.<priority>
instead: nodes fetch waiting high jobs before normal ones, low ones last.`,
		new: func() runner { return &jobCmd{} },
	},
	{
		name:     "status",
		synopsis: "status [flags] ID",
		summary:  "print a job's status: state, attempts, node, worker, times, last error, progress",
		detail: `Reads the job's entry in the status bucket (PYFLEET_STATUS, key <pool>.<id>).
The state is one of pending, scheduled, running, retrying, done, failed,
dead, cancelled. A job the bucket has no entry for (unknown, or older than
the results are kept) exits 1.`,
		new: func() runner { return &statusCmd{} },
	},
	{
		name:     "cancel",
		synopsis: "cancel [flags] ID",
		summary:  "cancel a job: a pending or scheduled one never runs, a running one is stopped",
		detail: `Marks the job cancelled in the status bucket, then tells the node running it
(<prefix>.cancel.job.<pool>.<id>), which stops it: an async function is
cancelled, a sync one's worker replaced unless it returns within the grace.
The job's result is then 499 Cancelled. Prints "cancelled ID"; exits 1 when
the job had ended already (done, failed, dead, cancelled) or has no status.`,
		new: func() runner { return &cancelCmd{} },
	},
	{
		name:     "schedules",
		synopsis: "schedules [list|add|remove] [flags] [NAME CRON FUNCTION [JSON|-]]",
		summary:  "list, add or remove recurring jobs (JetStream message schedules)",
		detail: `list (the default) prints the pool's recurring schedules. add NAME CRON
FUNCTION [JSON|-] makes FUNCTION run with JSON on CRON, each time a job of
its own (id NAME-<sequence>), replacing a schedule of that name; CRON is 5
fields (minute first), 6 (seconds first), "@every 10m" or @hourly/@daily/
@weekly/@monthly/@yearly, in UTC. remove NAME stops it. The schedules live in
the jobs stream (<prefix>.sched.<pool>.cron.<name>) and need nats-server >=
2.12; the server fires them whether or not a node runs.`,
		new: func() runner { return &schedulesCmd{} },
	},
	{
		name:     "watch",
		synopsis: "watch [flags]",
		summary:  "print lifecycle events as they happen, one a line",
		detail: `Follows <prefix>.evt.<pool>.<node>.<kind> until interrupted (SIGINT or
SIGTERM, then exit 0). Each event is one line: local time, node/worker, kind
and the fields present, or the event's JSON with --json.`,
		new: func() runner { return &watchCmd{} },
	},
	{
		name:     "nodes",
		synopsis: "nodes [flags]",
		summary:  "list live nodes: workers, busy, queued, handled, errors, uptime, containment",
		detail: `Asks every instance of the micro service "pyfleet" for its STATS and
lists those that answer within --wait. Exits 3 when none does.`,
		new: func() runner { return &nodesCmd{} },
	},
	{
		name:     "reload",
		synopsis: "reload [flags] [NODE...]",
		summary:  "reload the app on nodes, as SIGHUP does, with no call failed",
		detail: `Asks each NODE of --pool (default: every node of the pool that answers
within --wait) to reload its app (<prefix>.ctl.<pool>.<node>.reload): a new
template under --preload, then a rolling recycle, each replacement serving
before the worker it replaces stops. Nodes reload one after the other, so
the pool keeps serving. Prints "reloaded NODE in DURATION" for each; exits 1
when a node refused or did not finish within --timeout, 3 when no node
answers.`,
		new: func() runner { return &reloadCmd{} },
	},
	{
		name:     "ui",
		synopsis: "ui [flags]",
		summary:  "serve a live web view of the fleet: nodes, workers, functions, events, jobs",
		detail: `Serves one page on --listen (loopback by default) that shows every node of
every pool under the prefix, live: nodes (gone within a few seconds when
they stop answering), their workers, per-function rate and latency charts,
the lifecycle events, job counts and dead letters. It polls each node's
status subject (<prefix>.status) and needs nothing beyond NATS. With
--actions the page can requeue or discard a dead letter, cancel a job,
recycle a worker and drain a node; each action is logged on stderr with
the address that asked. Runs until SIGINT or SIGTERM.`,
		new: func() runner { return &uiCmd{} },
	},
	{
		name:     "fns",
		synopsis: "fns [flags]",
		summary:  "list a pool's functions: what each takes and returns",
		detail: `Asks every node of --pool for its micro service INFO and lists the functions
they serve: name, kind (json, stream, raw), the parameters (name?: type, "?"
when it has a default) and the return type, read from each function's JSON
Schema; --json prints the schemas whole. Exits 3 when no node answers.`,
		new: func() runner { return &fnsCmd{} },
	},
	{
		name:     "bench",
		synopsis: "bench [flags] FUNCTION [JSON]",
		summary:  "load a function, then report req/s, latency and errors",
		detail: `Runs -c concurrent callers over one NATS connection until -n requests are
done or --duration has passed (SIGINT stops early and still reports). Shows
a progress bar on stderr when it is a terminal. Latency covers every request
that got an answer, failed ones included.`,
		new: func() runner { return &benchCmd{} },
	},
}

func findCommand(name string) *command {
	for i := range commands {
		if commands[i].name == name {
			return &commands[i]
		}
	}
	return nil
}

// exitError carries an exit status other than 1 with its message.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

func usagef(format string, args ...any) error {
	return &exitError{code: exitUsage, err: fmt.Errorf(format, args...)}
}

func unavailablef(format string, args ...any) error {
	return &exitError{code: exitUnavailable, err: fmt.Errorf(format, args...)}
}

var errInterrupted = &exitError{code: exitInterrupted, err: errors.New("interrupted")}

func (a *app) subjects() protocol.Subjects {
	return protocol.Subjects{Prefix: a.prefix}
}

func (a *app) run(ctx context.Context, args []string) int {
	top := flag.NewFlagSet("submit", flag.ContinueOnError)
	a.globalFlags(top)
	top.SetOutput(io.Discard)
	if err := top.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			a.topUsage(a.stdout)
			return exitOK
		}
		return a.report("", usagef("%v", err))
	}
	args = top.Args()
	if len(args) == 0 {
		a.topUsage(a.stderr)
		return exitUsage
	}
	name, args := args[0], args[1:]
	if name == "help" {
		return a.help(args)
	}
	cmd := findCommand(name)
	if cmd == nil {
		return a.report("", usagef("unknown command %q", name))
	}
	r := cmd.new()
	fs := a.flagSet(cmd, r)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			a.commandUsage(a.stdout, cmd)
			return exitOK
		}
		return a.report(cmd.name, usagef("%v", err))
	}
	if err := a.validate(); err != nil {
		return a.report(cmd.name, err)
	}
	return a.report(cmd.name, r.run(ctx, a, fs.Args()))
}

// flagSet builds a command's flags plus the global ones. Global flags take
// their current value as default, so that values given before the command
// name survive the second registration.
func (a *app) flagSet(cmd *command, r runner) *flag.FlagSet {
	fs := flag.NewFlagSet("submit "+cmd.name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	r.flags(fs)
	a.globalFlags(fs)
	return fs
}

func (a *app) globalFlags(fs *flag.FlagSet) {
	a.conn.register(fs)
	fs.StringVar(&a.prefix, "prefix", a.prefix, "subject `PREFIX` of the fleet")
}

func (a *app) validate() error {
	if err := checkPrefix(a.prefix); err != nil {
		return err
	}
	return a.conn.validate()
}

// report prints err the way its kind asks for and returns the exit status.
func (a *app) report(cmd string, err error) int {
	if err == nil {
		return exitOK
	}
	var ce *client.Error
	switch {
	case errors.As(err, &ce) && !ce.Local:
		// The contract is the bare "code type: message", for scripts to parse.
		fmt.Fprintln(a.stderr, ce.Error())
		if ce.Code == call.CodeDeadline {
			return exitUnavailable
		}
		return exitFailed
	case errors.As(err, &ce) && (ce.Code == call.CodeBadRequest || ce.Code == call.CodeTooLarge):
		// The client refused to send it: submit failed, not the fleet.
		err = errors.New(ce.Message)
	case errors.As(err, &ce):
		// No node answered, or the one holding the call fell silent.
		err = &exitError{code: exitUnavailable, err: errors.New(ce.Message)}
	case errors.Is(err, context.Canceled):
		err = errInterrupted
	case isClosed(err):
		err = &exitError{code: exitUnavailable, err: err}
	}
	who := "submit"
	if cmd != "" {
		who += " " + cmd
	}
	fmt.Fprintf(a.stderr, "%s: %v\n", who, err)
	var ee *exitError
	if !errors.As(err, &ee) {
		return exitFailed
	}
	if ee.code == exitUsage {
		if cmd != "" {
			fmt.Fprintf(a.stderr, "Run 'submit help %s' for usage.\n", cmd)
		} else {
			fmt.Fprintln(a.stderr, "Run 'submit help' for usage.")
		}
	}
	return ee.code
}

func (a *app) help(args []string) int {
	if len(args) == 0 {
		a.topUsage(a.stdout)
		return exitOK
	}
	cmd := findCommand(args[0])
	if cmd == nil {
		return a.report("", usagef("unknown command %q", args[0]))
	}
	a.commandUsage(a.stdout, cmd)
	return exitOK
}

func (a *app) topUsage(w io.Writer) {
	var b strings.Builder
	b.WriteString("submit calls pyfleet functions over NATS.\n\nUsage:\n  submit [NATS options] COMMAND [flags] [args]\n\nCommands:\n")
	tw := tabwriter.NewWriter(&b, 0, 4, 2, ' ', 0)
	for _, c := range commands {
		fmt.Fprintf(tw, "  %s\t%s\n", c.name, c.summary)
	}
	fmt.Fprintf(tw, "  help\tshow a command's flags: submit help COMMAND\n")
	tw.Flush()
	b.WriteString("\nNATS options (accepted by every command, before or after its name):\n")
	fs := flag.NewFlagSet("submit", flag.ContinueOnError)
	a.globalFlags(fs)
	printFlags(&b, fs)
	b.WriteString(`
Exit status: 0 success, 1 the function failed, 2 usage, 3 no node answered,
the deadline passed or NATS unreachable, 130 interrupted.
`)
	io.WriteString(w, b.String())
}

func (a *app) commandUsage(w io.Writer, cmd *command) {
	var b strings.Builder
	fmt.Fprintf(&b, "Usage: submit %s\n\n%s\n\n%s\n", cmd.synopsis, capitalize(cmd.summary)+".", cmd.detail)
	own := flag.NewFlagSet(cmd.name, flag.ContinueOnError)
	cmd.new().flags(own)
	if strings.Contains(cmd.synopsis, "FUNCTION") {
		b.WriteString("\nFlags (before FUNCTION):\n")
	} else {
		b.WriteString("\nFlags:\n")
	}
	printFlags(&b, own)
	b.WriteString("\nNATS options: see 'submit help'.\n")
	io.WriteString(w, b.String())
}

// printFlags lists flags GNU-style ("--name VALUE"); both one and two dashes
// are accepted by the flag package.
func printFlags(w io.Writer, fs *flag.FlagSet) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	var names []string
	fs.VisitAll(func(f *flag.Flag) { names = append(names, f.Name) })
	sort.Strings(names)
	for _, n := range names {
		f := fs.Lookup(n)
		arg, usage := flag.UnquoteUsage(f)
		switch arg {
		case "duration":
			arg = "D"
		case "int", "value":
			arg = "N"
		}
		dash := "--"
		if len(n) == 1 {
			dash = "-"
		}
		def := ""
		if f.DefValue != "" && f.DefValue != "false" && f.DefValue != "0" && f.DefValue != "0s" && !secretFlags[n] {
			def = fmt.Sprintf(" (default %s)", f.DefValue)
			if g, ok := f.Value.(flag.Getter); ok {
				if _, isString := g.Get().(string); isString {
					def = fmt.Sprintf(" (default %q)", f.DefValue)
				}
			}
		}
		fmt.Fprintf(tw, "  %s%s %s\t%s%s\n", dash, n, arg, usage, def)
	}
	tw.Flush()
}

func capitalize(s string) string {
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + s[1:]
}

// syncWriter serialises writes from the command and from nats.go callbacks.
type syncWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}
