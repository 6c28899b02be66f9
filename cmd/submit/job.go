package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pyfleet/pyfleet/protocol"
)

type jobCmd struct {
	pool    string
	id      string
	replyTo string
	wait    bool
	timeout time.Duration
	headers bool
	raw     bool
}

func (c *jobCmd) flags(fs *flag.FlagSet) {
	fs.StringVar(&c.pool, "pool", "default", "`POOL` to run the job")
	fs.StringVar(&c.id, "id", "", "job `ID` (default: 16 random hex digits); one subject token")
	fs.StringVar(&c.replyTo, "reply-to", "", "also send the result to `SUBJECT` (Pyfleet-Reply-To)")
	fs.BoolVar(&c.wait, "wait", false, "wait for the result and print it instead of the id")
	fs.DurationVar(&c.timeout, "timeout", 0, "with --wait, give up after this long (default: wait until interrupted)")
	fs.BoolVar(&c.headers, "headers", false, "with --wait, print the result's headers on stderr")
	fs.BoolVar(&c.raw, "raw", false, "send the argument and print the result as raw bytes (raw functions)")
}

// publishTimeout bounds the wait for the stream's acknowledgement; jobs
// themselves may queue for as long as they like.
const publishTimeout = 10 * time.Second

func (c *jobCmd) run(ctx context.Context, a *app, args []string) error {
	fn, rest, err := functionArgs(args)
	if err != nil {
		return err
	}
	if err := checkToken("--pool", c.pool); err != nil {
		return err
	}
	if c.id == "" {
		c.id = randomID()
	} else if err := checkToken("--id", c.id); err != nil {
		return err
	}
	if c.timeout < 0 {
		return usagef("--timeout must not be negative")
	}
	body, err := payload(rest, a.stdin, c.raw)
	if err != nil {
		return err
	}

	nc, err := a.connect()
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	resultSubj := a.subjects().Result(c.pool, c.id)
	var results string
	var dead *deadWatch
	if c.wait {
		// Before publishing: a job whose result could never be read should
		// not be queued.
		if results, err = streamFor(ctx, nc, js, resultSubj, "PYFLEET_RESULTS"); err != nil {
			return err
		}
		dead = deadLetters(ctx, nc, js, a.subjects().Dead(c.pool, fn))
	}

	msg := nats.NewMsg(a.subjects().Job(c.pool, fn))
	msg.Data = body
	msg.Header.Set(protocol.HeaderMsgID, c.id)
	if c.replyTo != "" {
		msg.Header.Set(protocol.HeaderReplyTo, c.replyTo)
	}
	pctx, cancel := context.WithTimeout(ctx, publishTimeout)
	ack, err := js.PublishMsg(pctx, msg)
	cancel()
	switch {
	case errors.Is(err, jetstream.ErrNoStreamResponse):
		if err := noJetStream(ctx, nc, js); err != nil {
			return err
		}
		return unavailablef("no PYFLEET_JOBS stream: is a poolnode running?")
	case err != nil && ctx.Err() != nil:
		return errInterrupted
	case err != nil:
		return fmt.Errorf("publishing job to %s: %w", msg.Subject, err)
	}
	if ack.Duplicate {
		fmt.Fprintf(a.stderr, "submit job: id %s was already submitted; the job is not queued again\n", c.id)
	}
	if !c.wait {
		fmt.Fprintln(a.stdout, c.id)
		return nil
	}
	out := &output{stdout: a.stdout, stderr: a.stderr, headers: c.headers, raw: c.raw}
	return c.await(ctx, js, results, resultSubj, dead, out)
}

// deadWatch is where the job's dead letter would appear. A node that
// cannot store a job's error as its result (the results stream is full)
// still dead-letters the job, and then the dead letter is the only word of
// how the job ended.
type deadWatch struct {
	stream, subject string
	from            uint64 // the first sequence stored after the job's submission
}

// deadLetters finds the stream of subj and where it ends now, or nil if it
// cannot: the result alone is waited for then.
func deadLetters(ctx context.Context, nc *nats.Conn, js jetstream.JetStream, subj string) *deadWatch {
	name, err := streamFor(ctx, nc, js, subj, "PYFLEET_DEAD")
	if err != nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, publishTimeout)
	defer cancel()
	s, err := js.Stream(ctx, name)
	if err != nil {
		return nil
	}
	return &deadWatch{stream: name, subject: subj, from: s.CachedInfo().State.LastSeq + 1}
}

// streamFor names the stream that stores subj, looked up by subject so a
// non-default prefix needs no naming convention.
func streamFor(ctx context.Context, nc *nats.Conn, js jetstream.JetStream, subj, want string) (string, error) {
	lctx, cancel := context.WithTimeout(ctx, publishTimeout)
	defer cancel()
	name, err := js.StreamNameBySubject(lctx, subj)
	switch {
	case errors.Is(err, jetstream.ErrJetStreamNotEnabled), errors.Is(err, nats.ErrNoResponders):
		if err := noJetStream(ctx, nc, js); err != nil {
			return "", err
		}
		return "", unavailablef("no %s stream: is a poolnode running?", want)
	case errors.Is(err, jetstream.ErrStreamNotFound):
		return "", unavailablef("no %s stream: is a poolnode running?", want)
	case err != nil:
		return "", fmt.Errorf("looking up the stream of %s: %w", subj, err)
	}
	return name, nil
}

// noJetStream explains a JetStream request nobody answered when the reason
// is that the server has no JetStream at all (nats-server's default), which
// "no stream" would hide; nil when that is not it.
func noJetStream(ctx context.Context, nc *nats.Conn, js jetstream.JetStream) error {
	ctx, cancel := context.WithTimeout(ctx, publishTimeout)
	defer cancel()
	_, err := js.AccountInfo(ctx)
	server := fmt.Sprintf("%q at %s", nc.ConnectedServerName(), redactURLs(nc.ConnectedUrl()))
	switch {
	case errors.Is(err, jetstream.ErrJetStreamNotEnabled):
		return unavailablef("the NATS server %s has no JetStream, so jobs are unavailable "+
			"(start it with -js; `submit call` works without JetStream)", server)
	case errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount):
		return unavailablef("JetStream is not enabled for this account on the NATS server %s, so jobs are unavailable", server)
	}
	return nil
}

// await reads the job's result from the results stream, and its dead
// letter, if one comes first. An ordered consumer from the first message on
// the result's subject finds a result stored before it was created as well
// as one stored later, and all chunks of a streamed result in order.
func (c *jobCmd) await(ctx context.Context, js jetstream.JetStream, stream, subj string, dead *deadWatch, out *output) error {
	if c.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeoutCause(ctx, c.timeout, errDeadline)
		defer cancel()
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
		cons, err := js.OrderedConsumer(ctx, stream, cfg)
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
	wg.Add(1)
	go func() {
		defer wg.Done()
		failed <- read(stream, jetstream.OrderedConsumerConfig{
			FilterSubjects: []string{subj},
			DeliverPolicy:  jetstream.DeliverAllPolicy,
		}, func(jetstream.Msg) bool { return true })
	}()
	if dead != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Its failure is not the wait's: the result may still come.
			_ = read(dead.stream, jetstream.OrderedConsumerConfig{
				FilterSubjects: []string{dead.subject},
				DeliverPolicy:  jetstream.DeliverByStartSequencePolicy,
				OptStartSeq:    dead.from,
			}, func(m jetstream.Msg) bool { return m.Headers().Get(protocol.HeaderJobID) == c.id })
		}()
	}
	for {
		select {
		case m := <-msgs:
			// A dead letter's body holds the error as an error reply's does.
			if done, err := out.handle(m.Headers(), m.Data()); done || err != nil {
				return err
			}
		case err := <-failed:
			return c.waitErr(ctx, fmt.Errorf("reading %s: %w", subj, err))
		}
	}
}

func (c *jobCmd) waitErr(ctx context.Context, err error) error {
	switch {
	case errors.Is(context.Cause(ctx), errDeadline):
		return unavailablef("no result for job %s within %v", c.id, c.timeout)
	case ctx.Err() != nil:
		return errInterrupted
	}
	return err
}
