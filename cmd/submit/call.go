package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/protocol"
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
	subj := a.subjects().Request(c.pool, fn)
	if c.node != "" {
		subj = a.subjects().Node(c.node, c.pool, fn)
	}
	msg := nats.NewMsg(subj)
	msg.Data = body
	msg.Header.Set(protocol.HeaderTimeout, millis(c.timeout))
	if c.session != "" {
		msg.Header.Set(protocol.HeaderSession, c.session)
	}
	if c.requestID != "" {
		msg.Header.Set(protocol.HeaderRequestID, c.requestID)
	}

	nc, err := a.connect()
	if err != nil {
		return err
	}
	defer nc.Close()
	out := &output{stdout: a.stdout, stderr: a.stderr, headers: c.headers, raw: c.raw}
	return request(ctx, nc, msg, c.timeout, out)
}

var (
	errDeadline = errors.New("deadline passed")
	errNodeLost = errors.New("node lost")
)

// A call asks its node for a heartbeat at once and then every
// heartbeatEvery; silence for heartbeatLoss means the node died holding the
// call (or after it was routed to it, before it read it), which core NATS
// would otherwise never tell: the call fails then, not at its deadline.
const (
	heartbeatEvery = time.Second
	heartbeatLoss  = 3 * heartbeatEvery
)

// request sends msg and prints its answer. It does not use nc.Request: a
// streaming function answers with many messages, so it reads its own inbox
// until a message that is not a chunk.
func request(ctx context.Context, nc *nats.Conn, msg *nats.Msg, timeout time.Duration, out *output) error {
	sub, err := nc.SubscribeSync(nc.NewInbox())
	if err != nil {
		return err
	}
	defer sub.Unsubscribe()
	msg.Reply = sub.Subject

	ctx, cancel := context.WithTimeoutCause(ctx, timeout+replyMargin(timeout), errDeadline)
	defer cancel()
	msg.Header.Set(protocol.HeaderHeartbeat, millis(heartbeatEvery))
	if err := nc.PublishMsg(msg); err != nil {
		return err
	}
	heard := time.Now() // the last sign of life of the node holding the call
	var holder string
	for {
		waitCtx, cancelWait := context.WithDeadlineCause(ctx, heard.Add(heartbeatLoss), errNodeLost)
		m, err := sub.NextMsgWithContext(waitCtx)
		cancelWait()
		if err != nil && errors.Is(context.Cause(waitCtx), errNodeLost) {
			if holder == "" {
				return unavailablef("no node took the call on %s within %v (the node it reached may have died)", msg.Subject, heartbeatLoss)
			}
			return unavailablef("node %s stopped answering while it held the call (no heartbeat for %v): the call is lost", holder, heartbeatLoss)
		}
		if err == nil {
			heard = time.Now()
			if isHeartbeat(m.Header) {
				holder = protocol.Header(m.Header, protocol.HeaderNode)
				continue
			}
		}
		switch {
		case errors.Is(err, nats.ErrNoResponders), err == nil && isNoResponders(m):
			return unavailablef("no node serves %s", msg.Subject)
		case err != nil && errors.Is(context.Cause(ctx), errDeadline):
			if out.chunks > 0 {
				return unavailablef("%s: stream did not end within %v", msg.Subject, timeout)
			}
			return unavailablef("no answer from %s within %v", msg.Subject, timeout)
		case err != nil && ctx.Err() != nil:
			return errInterrupted
		case isClosed(err):
			return unavailablef("connection to NATS closed while waiting for %s", msg.Subject)
		case err != nil:
			return fmt.Errorf("waiting for %s: %w", msg.Subject, err)
		}
		if done, err := out.handle(m.Header, m.Data); done || err != nil {
			return err
		}
	}
}
