package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/client"
	"github.com/pyfleet/pyfleet/protocol"
)

type jobCmd struct {
	pool    string
	id      string
	replyTo string
	wait    bool
	timeout time.Duration
	// jobTimeout is the job's own deadline (Pyfleet-Timeout), apart from
	// timeout, which is only how long --wait waits.
	jobTimeout time.Duration
	headers    bool
	raw        bool
	priority   string
	delay      time.Duration // --delay, --at: a delayed job (schedules.go)
	at         string
}

func (c *jobCmd) flags(fs *flag.FlagSet) {
	fs.StringVar(&c.pool, "pool", "default", "`POOL` to run the job")
	fs.StringVar(&c.id, "id", "", "job `ID` (default: 16 random hex digits); one subject token")
	fs.StringVar(&c.replyTo, "reply-to", "", "also send the result to `SUBJECT` (Pyfleet-Reply-To)")
	fs.BoolVar(&c.wait, "wait", false, "wait for the result and print it instead of the id (on a terminal, with the job's state and progress bar on stderr)")
	fs.DurationVar(&c.timeout, "timeout", 0, "with --wait, give up after this long (default: wait until interrupted)")
	fs.DurationVar(&c.jobTimeout, "job-timeout", 0, "the job's deadline, from its start (Pyfleet-Timeout; default: the node's --job-timeout, 1h)")
	fs.BoolVar(&c.headers, "headers", false, "with --wait, print the result's headers on stderr")
	fs.BoolVar(&c.raw, "raw", false, "send the argument and print the result as raw bytes (raw functions)")
	fs.StringVar(&c.priority, "priority", "normal", "`high`, normal or low: nodes fetch waiting high jobs first, low ones last")
	fs.DurationVar(&c.delay, "delay", 0, "run the job this long from now (status scheduled until then; nats-server >= 2.12)")
	fs.StringVar(&c.at, "at", "", "run the job at `TIME` (RFC 3339, e.g. 2030-01-02T15:04:05Z)")
}

func (c *jobCmd) run(ctx context.Context, a *app, args []string) error {
	fn, rest, err := functionArgs(args)
	if err != nil {
		return err
	}
	if err := checkToken("--pool", c.pool); err != nil {
		return err
	}
	if c.id != "" {
		if err := checkToken("--id", c.id); err != nil {
			return err
		}
	}
	if c.timeout < 0 {
		return usagef("--timeout must not be negative")
	}
	if c.jobTimeout < 0 {
		return usagef("--job-timeout must not be negative")
	}
	if err := protocol.ValidPriority(c.priority); err != nil {
		return usagef("--priority: %v", err)
	}
	body, err := payload(rest, a.stdin, c.raw)
	if err != nil {
		return err
	}
	cl, err := a.connect(client.Options{Pool: c.pool})
	if err != nil {
		return err
	}
	defer cl.Close()
	opts := []client.Option{client.WithJobID(c.id), client.WithPriority(c.priority)}
	if c.replyTo != "" {
		opts = append(opts, client.WithReplyTo(c.replyTo))
	}
	if c.jobTimeout > 0 {
		opts = append(opts, client.WithTimeout(c.jobTimeout))
	}
	if c.wait {
		opts = append(opts, client.WithAwait())
	}
	if when, err := c.when(); err != nil {
		return err
	} else if when != nil {
		opts = append(opts, when)
	}
	job, err := cl.Submit(ctx, fn, body, opts...)
	if err != nil {
		return err
	}
	if job.Duplicate {
		fmt.Fprintf(a.stderr, "submit job: id %s was already submitted; the job is not queued again\n", job.ID)
	}
	if !c.wait {
		fmt.Fprintln(a.stdout, job.ID)
		return nil
	}
	if c.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.timeout)
		defer cancel()
	}
	var trailer nats.Header
	out := &output{stdout: a.stdout, stderr: a.stderr, headers: c.headers, raw: c.raw}
	stopBar := func() {}
	if a.stderrTTY {
		stopBar = startJobBar(ctx, a.stderr, job)
	}
	// The bar is cleared before the result is printed: stdout may be the
	// same terminal.
	msgs := job.Messages(ctx, client.WithReplyHeader(&trailer))
	err = out.show(func(yield func(*client.Msg, error) bool) {
		first := true
		for m, err := range msgs {
			if first {
				stopBar()
				first = false
			}
			if !yield(m, err) {
				return
			}
		}
		stopBar()
	}, &trailer)
	stopBar()
	var ce *client.Error
	if errors.As(err, &ce) && ce.Local && errors.Is(err, client.ErrDeadlineExceeded) {
		return unavailablef("no result for job %s within %v", job.ID, c.timeout)
	}
	return err
}
