package client

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"iter"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/protocol"
)

// Option tunes one call, stream, job submission or result wait. Each says
// where it applies; elsewhere it is ignored.
type Option func(*options)

type options struct {
	timeout   time.Duration
	session   string
	node      string
	requestID string
	header    *nats.Header
	jobID     string
	replyTo   string
	await     bool
	priority  string // a job's; see WithPriority
	progress  func(json.RawMessage)
	when      schedule // WithDelay, WithAt (client/schedule.go)
	detail    bool     // Nodes: ask for each node's status too (WithDetail)
	// first, when set, sees the headers of the answer's first message from
	// a worker, and last those of its last message (Session uses them).
	first, last func(nats.Header)
}

// WithProgress asks the node for the call's progress: f gets each value
// (JSON) the function passes to ctx.progress, as it comes and before the
// call returns, on the goroutine that makes the call. Without it the node
// sends none.
func WithProgress(f func(value json.RawMessage)) Option {
	return func(o *options) { o.progress = f }
}

// WithTimeout sets the deadline the node counts from its receipt of the
// call, time queued included, or from a job's start (Pyfleet-Timeout).
// Without it a call takes its context's deadline, else Options.Timeout; a
// job, the node's --job-timeout (1 h), never Options.Timeout.
// The client waits a little past it for the node's own 408, which says
// more than the client could. For Nodes, it is how long to collect
// answers.
func WithTimeout(d time.Duration) Option { return func(o *options) { o.timeout = d } }

// WithSession sends the call in a session (Pyfleet-Session): calls with the
// same key reach the same worker. Client.Session also routes the calls
// after the first to the node that holds the session.
func WithSession(key string) Option { return func(o *options) { o.session = key } }

// WithNode sends the call to that node only (<prefix>.node.<node>.…).
func WithNode(node string) Option { return func(o *options) { o.node = node } }

// WithRequestID sets Pyfleet-Request-Id, which every message of the answer
// echoes; on a job, also the result.
func WithRequestID(id string) Option { return func(o *options) { o.requestID = id } }

// WithReplyHeader stores the headers of the answer's last message in h:
// the reply, the end of a stream, or the error (Pyfleet-Node,
// Pyfleet-Worker...). For calls, streams and job results.
func WithReplyHeader(h *nats.Header) Option { return func(o *options) { o.header = h } }

// WithJobID names a submitted job (Nats-Msg-Id); default 16 random hex
// digits. A second submission of an id within the jobs stream's dedup
// window (2 minutes) is not queued again: Job.Duplicate says so.
func WithJobID(id string) Option { return func(o *options) { o.jobID = id } }

// WithReplyTo asks the node to also send a job's result to subject, by
// core NATS (Pyfleet-Reply-To).
func WithReplyTo(subject string) Option { return func(o *options) { o.replyTo = subject } }

// WithAwait tells Submit that its caller will wait for the result: Submit
// first makes sure the results stream exists, so that a job whose result
// could never be read is not queued, and notes where the dead-letter
// stream ends, so that Job.Result also sees a dead letter stored before it
// was called.
func WithAwait() Option { return func(o *options) { o.await = true } }

func collect(opts []Option) *options {
	o := &options{}
	for _, f := range opts {
		if f != nil {
			f(o)
		}
	}
	return o
}

// Msg is one message of an answer: a function's result or one item of a
// stream, or a stored job result.
type Msg struct {
	Data   []byte
	Header nats.Header
}

// Decode unmarshals the message's JSON into v.
func (m *Msg) Decode(v any) error { return json.Unmarshal(m.Data, v) }

// Node is the node that sent the message.
func (m *Msg) Node() string { return protocol.Header(m.Header, protocol.HeaderNode) }

// Worker is the worker that ran the call.
func (m *Msg) Worker() string { return protocol.Header(m.Header, protocol.HeaderWorker) }

// Chunk reports whether the message is one item of a stream, rather than a
// whole result.
func (m *Msg) Chunk() bool {
	return protocol.Header(m.Header, protocol.HeaderStream) == protocol.StreamChunk
}

// encode makes a request body: []byte and json.RawMessage as they are (a
// raw function's bytes, or JSON the caller made), anything else as JSON.
func encode(arg any) ([]byte, error) {
	switch a := arg.(type) {
	case []byte:
		return a, nil
	case json.RawMessage:
		return a, nil
	}
	b, err := json.Marshal(arg)
	if err != nil {
		return nil, fmt.Errorf("encoding the argument: %w", err)
	}
	return b, nil
}

// decode stores a result in result: nil drops it, *[]byte and
// *json.RawMessage take the bytes as they are, anything else is decoded
// from JSON.
func decode(data []byte, result any) error {
	switch r := result.(type) {
	case nil:
		return nil
	case *[]byte:
		*r = data
		return nil
	case *json.RawMessage:
		*r = data
		return nil
	}
	if err := json.Unmarshal(data, result); err != nil {
		return fmt.Errorf("decoding the result: %w", err)
	}
	return nil
}

// joinItems is what Call and Job.Result return for a stream: its items as
// one JSON array, as a node stores a streamed job's result; for a *[]byte
// result, end to end, as it stores a raw one's.
func joinItems(items [][]byte, result any) []byte {
	if _, raw := result.(*[]byte); raw {
		return bytes.Join(items, nil)
	}
	var b bytes.Buffer
	b.WriteByte('[')
	for i, it := range items {
		if i > 0 {
			b.WriteByte(',')
		}
		b.Write(it)
	}
	b.WriteByte(']')
	return b.Bytes()
}

// Call calls function with arg and stores its result in result.
//
// arg is sent as JSON, except a []byte or json.RawMessage, sent as it is
// (the bytes of a function exported with raw=True, or JSON already made);
// nil is JSON null. result is decoded from JSON, except a *[]byte or
// *json.RawMessage, which gets the bytes as they are; nil drops the result.
// A generator function's items come as one JSON array (end to end for a
// *[]byte); Stream gives them one by one.
//
// A failure is an *Error (errors.Is(err, ErrNotFound)...), ctx's error when
// ctx is cancelled, or an error of NATS.
func (c *Client) Call(ctx context.Context, function string, arg, result any, opts ...Option) error {
	return collectAnswer(c.Stream(ctx, function, arg, opts...), result)
}

// collectAnswer stores the answer that msgs carry in result: its one message,
// or its streamed items as one JSON array (joinItems); or returns the
// first error.
func collectAnswer(msgs iter.Seq2[*Msg, error], result any) error {
	var items [][]byte
	var single []byte
	chunked := false
	for m, err := range msgs {
		if err != nil {
			return err
		}
		if m.Chunk() {
			chunked = true
			items = append(items, m.Data)
		} else {
			single = m.Data
		}
	}
	if chunked {
		single = joinItems(items, result)
	}
	return decode(single, result)
}

// Stream calls function with arg (sent as by Call) and yields the answer as
// it comes: each item of a generator function as soon as the node sends
// it, or the one result of any other function. Errors are yielded last,
// with a nil *Msg, and end the sequence; breaking out of the loop abandons
// the call. A sequence runs its call again each time it is ranged over.
//
// The range-over-func form (iter.Seq2) is how Go 1.23 and later spell a
// sequence that can fail: the loop reads like one over a slice, and the
// stream's subscription lives exactly as long as the loop.
func (c *Client) Stream(ctx context.Context, function string, arg any, opts ...Option) iter.Seq2[*Msg, error] {
	return func(yield func(*Msg, error) bool) {
		o := collect(opts)
		body, err := encode(arg)
		if err == nil {
			err = checkName("function", function)
		}
		if err == nil && o.node != "" {
			err = checkName("node", o.node)
		}
		if err != nil {
			yield(nil, err)
			return
		}
		subj := c.subjects.Request(c.pool, function)
		if o.node != "" {
			subj = c.subjects.Node(o.node, c.pool, function)
		}
		stopped := false
		err = c.exchange(ctx, subj, body, o, func(m *Msg) bool {
			stopped = !yield(m, nil)
			return !stopped
		})
		if err != nil && !stopped {
			yield(nil, err)
		}
	}
}

// checkName refuses a name that is not one subject token before it is put
// in a subject, where a dot would silently address another one.
func checkName(what, v string) error {
	if err := protocol.ValidToken(v); err != nil {
		return &Error{Code: call.CodeBadRequest, Type: call.TypeBadRequest, Local: true,
			Message: fmt.Sprintf("%s: %v", what, err), err: err}
	}
	return nil
}

var errDeadline = errors.New("deadline passed")

// replyMargin is how long past the deadline the client still waits, so the
// node's own 408, which says more than a client-side timeout, gets through.
func replyMargin(timeout time.Duration) time.Duration {
	return min(max(timeout/10, 500*time.Millisecond), 5*time.Second)
}

// millis renders a duration for Pyfleet-Timeout and Pyfleet-Heartbeat,
// rounding up so a short one never becomes 0, which would mean "none".
func millis(d time.Duration) string {
	return strconv.FormatInt(int64((d+time.Millisecond-1)/time.Millisecond), 10)
}

// exchange sends one request to subj and hands each item of its answer to
// yield (chunks, or the single result) until the answer ends, yield
// returns false, or the call fails. It reads the answer from its own inbox
// rather than with nc.Request: a streaming function answers with many
// messages, and heartbeats come before the answer.
func (c *Client) exchange(ctx context.Context, subj string, body []byte, o *options, yield func(*Msg) bool) error {
	timeout := o.timeout
	if timeout <= 0 {
		timeout = c.timeout
		if dl, ok := ctx.Deadline(); ok {
			timeout = time.Until(dl)
		}
	}
	if timeout <= 0 {
		return localError(call.CodeDeadline, call.TypeDeadline, context.DeadlineExceeded,
			"the deadline of %s passed before it was sent", subj)
	}
	ib, err := c.mux.open()
	if err != nil {
		return fmt.Errorf("calling %s: %w", subj, err)
	}
	defer c.mux.close(ib)

	msg := &nats.Msg{Subject: subj, Reply: ib.subject, Data: body, Header: nats.Header{}}
	msg.Header.Set(protocol.HeaderTimeout, millis(timeout))
	if o.session != "" {
		msg.Header.Set(protocol.HeaderSession, o.session)
	}
	if o.requestID != "" {
		msg.Header.Set(protocol.HeaderRequestID, o.requestID)
	}
	if o.progress != nil {
		msg.Header.Set(protocol.HeaderProgress, "1")
	}
	var lost *time.Timer
	if c.beat > 0 {
		msg.Header.Set(protocol.HeaderHeartbeat, millis(c.beat))
		lost = time.NewTimer(heartbeatsLost * c.beat)
		defer lost.Stop()
	}
	wctx, cancel := context.WithTimeoutCause(ctx, timeout+replyMargin(timeout), errDeadline)
	defer cancel()
	if err := c.nc.PublishMsg(msg); err != nil {
		if errors.Is(err, nats.ErrMaxPayload) {
			return localError(call.CodeTooLarge, call.TypeTooLarge, err,
				"the argument of %s (%d bytes) is over the NATS max payload (%d bytes)", subj, len(body), c.nc.MaxPayload())
		}
		return fmt.Errorf("calling %s: %w", subj, err)
	}
	var holder string // the node that said it holds the call
	chunks := 0
	for {
		m, err := ib.wait(wctx, lost)
		switch {
		case errors.Is(err, errSilent):
			if holder == "" {
				return localError(call.CodeUnavailable, TypeNodeLost, nil,
					"no node took the call on %s within %v (the node it reached may have died)", subj, heartbeatsLost*c.beat)
			}
			e := localError(call.CodeFailed, call.TypeWorkerLost, nil,
				"node %s stopped answering while it held the call (no heartbeat for %v): the call is lost", holder, heartbeatsLost*c.beat)
			e.Node = holder
			return e
		case err != nil && ctx.Err() == context.Canceled:
			c.cancelCall(ib.subject)
			return ctx.Err()
		case err != nil && wctx.Err() != nil:
			shown := timeout
			if o.timeout <= 0 {
				shown = timeout.Round(time.Millisecond)
			}
			if chunks > 0 {
				return localError(call.CodeDeadline, call.TypeDeadline, context.DeadlineExceeded,
					"%s: stream did not end within %v", subj, shown)
			}
			return localError(call.CodeDeadline, call.TypeDeadline, context.DeadlineExceeded,
				"no answer from %s within %v", subj, shown)
		case errors.Is(err, errClosed):
			return fmt.Errorf("connection to NATS closed while waiting for %s: %w", subj, nats.ErrConnectionClosed)
		case errors.Is(err, errOverflow):
			return localError(call.CodeFailed, TypeSlowConsumer, nil,
				"%s: more than %d MiB of the answer arrived unread (a stream faster than its reader): the call is abandoned", subj, maxBuffered>>20)
		case err != nil:
			return fmt.Errorf("waiting for %s: %w", subj, err)
		}
		if lost != nil {
			lost.Reset(heartbeatsLost * c.beat)
		}
		h := m.Header
		if len(m.Data) == 0 && h.Get("Status") == "503" {
			// The server's "no responders"; a node's 503 has a body.
			return localError(call.CodeUnavailable, TypeNoResponders, nats.ErrNoResponders, "no node serves %s", subj)
		}
		if n := protocol.Header(h, protocol.HeaderNode); n != "" {
			holder = n
		}
		kind := protocol.Header(h, protocol.HeaderStream)
		if kind == protocol.StreamHeartbeat {
			continue
		}
		if kind == protocol.StreamProgress {
			if o.progress != nil {
				o.progress(json.RawMessage(m.Data))
			}
			continue
		}
		if o.first != nil && protocol.Header(h, protocol.HeaderWorker) != "" {
			o.first(h)
			o.first = nil
		}
		if kind == protocol.StreamChunk {
			chunks++
			if !yield(&Msg{Data: m.Data, Header: h}) {
				c.cancelCall(ib.subject) // the caller broke out of its loop
				return nil
			}
			continue
		}
		return finish(h, m.Data, chunks > 0, o, yield)
	}
}

// cancelCall tells the node running the call that answers to reply that
// its caller gave up (docs/protocol.md, "Cancel"): it stops the call as at
// its deadline. Best effort: a node that already answered ignores it.
func (c *Client) cancelCall(reply string) {
	_ = c.nc.Publish(c.subjects.CancelCall(c.pool), []byte(reply))
}

// finish handles the last message of an answer, live or stored: an error,
// the end of a stream, or the single result.
func finish(h nats.Header, data []byte, streamed bool, o *options, yield func(*Msg) bool) error {
	if o.header != nil {
		*o.header = h
	}
	if o.last != nil {
		o.last(h)
	}
	if e := replyError(h, data); e != nil {
		return e
	}
	if streamed || protocol.Header(h, protocol.HeaderStream) == protocol.StreamEnd {
		return nil // the end of a stream carries headers, not a value
	}
	yield(&Msg{Data: data, Header: h})
	return nil
}
