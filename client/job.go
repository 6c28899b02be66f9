package client

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/protocol"
)

// jsTimeout bounds each JetStream API request (a publish acknowledgement, a
// stream lookup); jobs themselves may queue for as long as they like.
const jsTimeout = 10 * time.Second

// Job is a job submitted to the pool, or a handle for one submitted
// elsewhere (Client.Job).
type Job struct {
	// ID is the job's Nats-Msg-Id, which names its result subject.
	ID string
	// Duplicate says the jobs stream already had this id within its dedup
	// window: this submission was not queued, and the result is the first
	// one's.
	Duplicate bool
	// Seq is the job's sequence in the jobs stream (0 for a handle); for a
	// delayed job, its schedule's.
	Seq uint64
	// At is when a delayed job (WithDelay, WithAt) is due; zero otherwise.
	At time.Time

	c        *Client
	function string // "" for a handle: its dead letter may be under any function
	dead     *deadWatch
}

// deadWatch is where the job's dead letter would appear. A node that
// cannot store a job's error as its result (the results stream is full)
// still dead-letters the job, and then the dead letter is the only word of
// how the job ended.
type deadWatch struct {
	stream, subject string
	from            uint64 // the first sequence stored after the job's submission
}

// Submit queues a job: function with arg (sent as by Call), run by one node
// of the pool as soon as one has a free worker, at least once, its result
// stored for 24 hours. WithJobID names it, WithReplyTo forwards the result,
// WithTimeout bounds its run, WithSession and WithRequestID go with it,
// WithAwait prepares for Job.Result, WithPriority puts it before or after
// others.
func (c *Client) Submit(ctx context.Context, function string, arg any, opts ...Option) (*Job, error) {
	o := collect(opts)
	if err := checkName("function", function); err != nil {
		return nil, err
	}
	if err := checkPriority(o.priority); err != nil {
		return nil, err
	}
	body, err := encode(arg)
	if err != nil {
		return nil, err
	}
	j := &Job{ID: o.jobID, c: c, function: function}
	if j.ID == "" {
		j.ID = randomID()
	} else if err := checkName("job id", j.ID); err != nil {
		return nil, err
	}
	if o.await {
		// Before publishing: a job whose result could never be read should
		// not be queued.
		if _, err := c.streamFor(ctx, c.subjects.Result(c.pool, j.ID), "RESULTS"); err != nil {
			return nil, err
		}
		j.dead = c.deadLetters(ctx, c.subjects.Dead(c.pool, function))
	}
	msg := nats.NewMsg(c.subjects.JobPriority(c.pool, function, o.priority))
	msg.Data = body
	msg.Header.Set(protocol.HeaderMsgID, j.ID)
	if o.replyTo != "" {
		msg.Header.Set(protocol.HeaderReplyTo, o.replyTo)
	}
	if o.timeout > 0 {
		msg.Header.Set(protocol.HeaderTimeout, millis(o.timeout))
	}
	if o.session != "" {
		msg.Header.Set(protocol.HeaderSession, o.session)
	}
	if o.requestID != "" {
		msg.Header.Set(protocol.HeaderRequestID, o.requestID)
	}
	if j.At, err = c.delayJob(ctx, msg, j.ID, o.when); err != nil {
		return nil, err
	}
	pctx, cancel := context.WithTimeout(ctx, jsTimeout)
	ack, err := c.js.PublishMsg(pctx, msg)
	cancel()
	switch {
	case errors.Is(err, jetstream.ErrMessageSchedulesDisabled):
		return nil, c.schedulesDisabled(ctx, err)
	case errors.Is(err, jetstream.ErrNoStreamResponse):
		if err := c.noJetStream(ctx); err != nil {
			return nil, err
		}
		return nil, noStream(c.streamName("JOBS"), err)
	case errors.Is(err, nats.ErrMaxPayload):
		return nil, localError(call.CodeTooLarge, call.TypeTooLarge, err,
			"the argument of job %s (%d bytes) is over the NATS max payload (%d bytes)", j.ID, len(body), c.nc.MaxPayload())
	case err != nil && ctx.Err() != nil:
		return nil, ctx.Err()
	case err != nil:
		return nil, fmt.Errorf("publishing job to %s: %w", msg.Subject, err)
	}
	j.Duplicate, j.Seq = ack.Duplicate, ack.Sequence
	if !j.Duplicate {
		c.setPending(ctx, j)
	}
	return j, nil
}

// Job is a handle for the job id of the client's pool, submitted here or
// elsewhere, to wait for its result. It sends nothing.
func (c *Client) Job(id string) *Job { return &Job{ID: id, c: c} }

// streamName is the name a node gives the stream of kind (JOBS, RESULTS,
// DEAD) under the client's prefix, for messages.
func (c *Client) streamName(kind string) string {
	return strings.ToUpper(strings.ReplaceAll(c.subjects.Root(), ".", "_")) + "_" + kind
}

func noStream(name string, cause error) *Error {
	return localError(call.CodeUnavailable, TypeNoStream, cause, "no %s stream: is a poolnode running?", name)
}

// streamFor names the stream that stores subj, looked up by subject so an
// operator's own stream names work too. It remembers what it found.
func (c *Client) streamFor(ctx context.Context, subj, kind string) (string, error) {
	key := kind + " " + subj
	if kind == "RESULTS" || kind == "DEAD" {
		key = kind // one stream holds them all
	}
	c.mu.Lock()
	name, ok := c.streams[key]
	c.mu.Unlock()
	if ok {
		return name, nil
	}
	lctx, cancel := context.WithTimeout(ctx, jsTimeout)
	defer cancel()
	name, err := c.js.StreamNameBySubject(lctx, subj)
	switch {
	case errors.Is(err, jetstream.ErrJetStreamNotEnabled), errors.Is(err, nats.ErrNoResponders):
		if err := c.noJetStream(ctx); err != nil {
			return "", err
		}
		return "", noStream(c.streamName(kind), err)
	case errors.Is(err, jetstream.ErrStreamNotFound):
		return "", noStream(c.streamName(kind), err)
	case err != nil && ctx.Err() != nil:
		return "", ctx.Err()
	case err != nil:
		return "", fmt.Errorf("looking up the stream of %s: %w", subj, err)
	}
	c.mu.Lock()
	if c.streams == nil {
		c.streams = map[string]string{}
	}
	c.streams[key] = name
	c.mu.Unlock()
	return name, nil
}

// noJetStream explains a JetStream request nobody answered when the reason
// is that the server has no JetStream at all (nats-server's default), which
// "no stream" would hide; nil when that is not it.
func (c *Client) noJetStream(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, jsTimeout)
	defer cancel()
	_, err := c.js.AccountInfo(ctx)
	server := fmt.Sprintf("%q at %s", c.nc.ConnectedServerName(), RedactURLs(c.nc.ConnectedUrl()))
	switch {
	case errors.Is(err, jetstream.ErrJetStreamNotEnabled):
		return localError(call.CodeUnavailable, TypeNoJetStream, err, "the NATS server %s has no JetStream, so jobs are unavailable "+
			"(start it with -js; `submit call` works without JetStream)", server)
	case errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount):
		return localError(call.CodeUnavailable, TypeNoJetStream, err,
			"JetStream is not enabled for this account on the NATS server %s, so jobs are unavailable", server)
	}
	return nil
}

// deadLetters finds the stream of subj and where it ends now, or nil if it
// cannot: the result alone is waited for then.
func (c *Client) deadLetters(ctx context.Context, subj string) *deadWatch {
	name, err := c.streamFor(ctx, subj, "DEAD")
	if err != nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, jsTimeout)
	defer cancel()
	s, err := c.js.Stream(ctx, name)
	if err != nil {
		return nil
	}
	return &deadWatch{stream: name, subject: subj, from: s.CachedInfo().State.LastSeq + 1}
}

// Result waits for the job's stored result and stores it in result (as
// Call does), or returns the job's error: the one stored as its result, or
// its dead letter's. It waits until ctx is done; then the error matches
// ErrDeadlineExceeded (Local) if ctx's deadline passed. WithReplyHeader
// applies.
func (j *Job) Result(ctx context.Context, result any, opts ...Option) error {
	return collectAnswer(j.Messages(ctx, opts...), result)
}

// Messages waits for the job's stored result and yields it as stored: one
// message (a node stores a stream's items as one JSON array), or each item
// of a result stored item by item; an error ends the sequence, as in
// Stream.
//
// It reads the result subject with an ordered consumer from its first
// message, which finds a result stored before it looked as well as one
// stored later, and the job's dead letter beside it. A job submitted
// WithAwait sees its dead letter from its submission on; otherwise only a
// dead letter stored after Messages started counts (a node stores a job's
// final error as its result too, so this matters only when the results
// stream refused it).
func (j *Job) Messages(ctx context.Context, opts ...Option) iter.Seq2[*Msg, error] {
	return func(yield func(*Msg, error) bool) {
		o := collect(opts)
		stopped := false
		err := j.await(ctx, o, func(m *Msg) bool {
			stopped = !yield(m, nil)
			return !stopped
		})
		if err != nil && !stopped {
			yield(nil, err)
		}
	}
}

func (j *Job) await(ctx context.Context, o *options, yield func(*Msg) bool) error {
	c := j.c
	if err := checkName("job id", j.ID); err != nil {
		return err
	}
	subj := c.subjects.Result(c.pool, j.ID)
	stream, err := c.streamFor(ctx, subj, "RESULTS")
	if err != nil {
		return err
	}
	dead := j.dead
	if dead == nil {
		fn := j.function
		if fn == "" {
			fn = "*"
		}
		dead = c.deadLetters(ctx, c.subjects.Dead(c.pool, fn))
	}

	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		cancel()
		wg.Wait()
	}()
	msgs := make(chan jetstream.Msg)
	failed := make(chan error, 1)
	read := func(stream string, cfg jetstream.OrderedConsumerConfig, keep func(jetstream.Msg) bool) error {
		cons, err := c.js.OrderedConsumer(ctx, stream, cfg)
		if err != nil {
			return err
		}
		it, err := cons.Messages()
		if err != nil {
			return err
		}
		defer it.Stop()
		// Next has no context; stopping the iterator is what unblocks it.
		defer context.AfterFunc(ctx, it.Stop)()
		for {
			m, err := it.Next()
			if err != nil {
				return err
			}
			if !keep(m) {
				continue
			}
			select {
			case msgs <- m:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
	wg.Go(func() {
		failed <- read(stream, jetstream.OrderedConsumerConfig{
			FilterSubjects: []string{subj},
			DeliverPolicy:  jetstream.DeliverAllPolicy,
		}, func(jetstream.Msg) bool { return true })
	})
	if dead != nil {
		wg.Go(func() {
			// Its failure is not the wait's: the result may still come.
			_ = read(dead.stream, jetstream.OrderedConsumerConfig{
				FilterSubjects: []string{dead.subject},
				DeliverPolicy:  jetstream.DeliverByStartSequencePolicy,
				OptStartSeq:    dead.from,
			}, func(m jetstream.Msg) bool { return protocol.Header(m.Headers(), protocol.HeaderJobID) == j.ID })
		})
	}
	streamed := false
	for {
		select {
		case m := <-msgs:
			h := m.Headers()
			if protocol.Header(h, protocol.HeaderStream) == protocol.StreamChunk {
				streamed = true
				if !yield(&Msg{Data: m.Data(), Header: h}) {
					return nil
				}
				continue
			}
			// A dead letter's body holds the error as an error reply's does.
			return finish(h, m.Data(), streamed, o, yield)
		case err := <-failed:
			switch {
			case errors.Is(ctx.Err(), context.DeadlineExceeded):
				return localError(call.CodeDeadline, call.TypeDeadline, context.DeadlineExceeded, "no result for job %s", j.ID)
			case ctx.Err() != nil:
				return ctx.Err()
			}
			return fmt.Errorf("reading %s: %w", subj, err)
		}
	}
}
