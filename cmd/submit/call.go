package main

import (
	"context"
	"flag"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/client"
)

type callCmd struct {
	pool      string
	node      string
	session   string
	requestID string
	timeout   time.Duration
	headers   bool
	raw       bool
}

func (c *callCmd) flags(fs *flag.FlagSet) {
	fs.StringVar(&c.pool, "pool", "default", "`POOL` to call")
	fs.StringVar(&c.node, "node", "", "send to this `NODE` only (keeps a session on the node that holds it)")
	fs.StringVar(&c.session, "session", "", "`SESSION` id: calls with the same id reach the same worker")
	fs.StringVar(&c.requestID, "request-id", "", "`ID` sent as Pyfleet-Request-Id, for tracing")
	fs.DurationVar(&c.timeout, "timeout", 60*time.Second, "deadline of the call, time queued included")
	fs.BoolVar(&c.headers, "headers", false, "print reply headers (node, worker) on stderr")
	fs.BoolVar(&c.raw, "raw", false, "send the argument and print the result as raw bytes (raw functions)")
}

func (c *callCmd) run(ctx context.Context, a *app, args []string) error {
	fn, rest, err := functionArgs(args)
	if err != nil {
		return err
	}
	if err := checkToken("--pool", c.pool); err != nil {
		return err
	}
	if c.node != "" {
		if err := checkToken("--node", c.node); err != nil {
			return err
		}
	}
	if c.timeout <= 0 {
		return usagef("--timeout must be positive")
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
	var trailer nats.Header
	opts := []client.Option{client.WithTimeout(c.timeout), client.WithReplyHeader(&trailer)}
	if c.session != "" {
		opts = append(opts, client.WithSession(c.session))
	}
	if c.node != "" {
		opts = append(opts, client.WithNode(c.node))
	}
	if c.requestID != "" {
		opts = append(opts, client.WithRequestID(c.requestID))
	}
	out := &output{stdout: a.stdout, stderr: a.stderr, headers: c.headers, raw: c.raw}
	// The body goes as it is: JSON checked by payload, or raw bytes.
	return out.show(cl.Stream(ctx, fn, body, opts...), &trailer)
}
