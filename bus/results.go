package bus

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/protocol"
)

// storedResult returns the stored result of d's job if it succeeded. A
// stored error does not count: it was the final answer to an earlier
// submission, and submitting the job again asks for another try. Nor does a
// result that does not name this job and its function: anyone who can
// publish to the results subjects could have put it there, and running the
// job again is safe where trusting it is not.
func (j *Jobs) storedResult(d *delivery) (*nats.Msg, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	raw, err := j.state.Load().results.GetLastMsgForSubject(ctx, j.subj.Result(j.cfg.Pool, d.id))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if protocol.Header(raw.Header, protocol.HeaderStatus) != protocol.StatusOK {
		return nil, nil
	}
	if id, fn := protocol.Header(raw.Header, protocol.HeaderJobID), protocol.Header(raw.Header, protocol.HeaderFunction); id != d.id || fn != d.function {
		d.log.Warn("stored result is not this job's; ignored, the job runs",
			zap.Uint64("result_seq", raw.Sequence), zap.String("its_job", id), zap.String("its_function", fn))
		return nil, nil
	}
	return &nats.Msg{Header: raw.Header, Data: raw.Data}, nil
}

// storeResult stores m as the result of the job and waits for the stream's
// acknowledgement. A result too large for the stream comes back as a 413
// *call.Error, and one the stream refuses (full, with discard new) as a 503
// TypeResultRefused one: the job would end the same way every time.
func (j *Jobs) storeResult(who jobIdentity, m *nats.Msg) error {
	m.Subject = j.subj.Result(j.cfg.Pool, who.id)
	m.Header[protocol.HeaderJobID] = []string{who.id}
	if protocol.ValidToken(who.function) == nil {
		m.Header[protocol.HeaderFunction] = []string{who.function}
	}
	m.Header[protocol.HeaderMsgID] = []string{who.msgID()}
	err := j.jsPublish(m)
	r := refusal(err, j.nc)
	switch {
	case r == nil:
		return err
	case r.tooLarge:
		return call.Errorf(call.CodeTooLarge, call.TypeTooLarge, "result of %d bytes cannot be stored: %s", len(m.Data), r.reason)
	default:
		return call.Errorf(call.CodeUnavailable, call.TypeResultRefused, "the results stream %s refused to store the job's result: %s", j.streams.Results, r.reason)
	}
}

// jsPublish publishes m to a stream and waits for its acknowledgement. A
// stream electing a leader (its server died) stores nothing for a few
// seconds: it sends again, for up to AckWait, which is harmless (m has a
// Nats-Msg-Id) and better than running the job again. A stream that
// answers with a refusal is not asked again.
func (j *Jobs) jsPublish(m *nats.Msg) error {
	giveUp := time.Now().Add(j.cfg.AckWait)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err := j.js.PublishMsg(ctx, m)
		cancel()
		if err == nil || refusal(err, j.nc) != nil || errors.Is(err, nats.ErrConnectionClosed) || time.Now().After(giveUp) {
			return err
		}
		j.log.Warn("cannot store in a stream yet; trying again", zap.String("subject", m.Subject), zap.Error(err))
		time.Sleep(500 * time.Millisecond)
	}
}

// streamRefusal is a publish a stream will refuse again if asked again.
type streamRefusal struct {
	tooLarge bool
	reason   string
}

// refusal says whether err is a stream's refusal to store a message, and
// why: too large for the max payload or the stream's max message size, or
// the stream (or the account) is full and discards new messages.
func refusal(err error, nc *nats.Conn) *streamRefusal {
	if errors.Is(err, nats.ErrMaxPayload) {
		return &streamRefusal{tooLarge: true, reason: fmt.Sprintf("over the NATS max payload of %d bytes", nc.MaxPayload())}
	}
	var ae *jetstream.APIError
	if !errors.As(err, &ae) {
		return nil
	}
	switch ae.ErrorCode {
	case jsErrStreamMessageExceedsMaximum:
		return &streamRefusal{tooLarge: true, reason: ae.Description + " (the stream's max message size)"}
	case jsErrStreamStoreFailed:
		// The same code says "store is closed" while a stream moves or
		// restarts, and that passes.
		switch d := ae.Description; {
		case strings.Contains(d, "too large"):
			return &streamRefusal{tooLarge: true, reason: d}
		case strings.HasPrefix(d, "maximum"): // messages, bytes, messages per subject
			return &streamRefusal{reason: d + " (the stream is full and its discard policy is new)"}
		}
	case jsErrAccountResourcesExceeded, jsErrInsufficientResources:
		return &streamRefusal{reason: ae.Description}
	}
	return nil
}

// JetStream error codes of a publish that storing again would not change
// (nats-server's jetstream_errors_generated.go); jetstream names only some.
const (
	jsErrAccountResourcesExceeded    jetstream.ErrorCode = 10002
	jsErrInsufficientResources       jetstream.ErrorCode = 10023
	jsErrStreamMessageExceedsMaximum                     = jetstream.JSErrCodeStreamMessageExceedsMaximum
	jsErrStreamStoreFailed           jetstream.ErrorCode = 10077
)

// forward sends the result to the job's Pyfleet-Reply-To, if any. Core NATS:
// the result is already stored, so this is a courtesy that may be missed.
func (j *Jobs) forward(d *delivery, m *nats.Msg) {
	j.forwardTo(d.replyTo, d.id, m)
}

func (j *Jobs) forwardTo(to, id string, m *nats.Msg) {
	if to == "" {
		return
	}
	h := nats.Header{}
	for k, v := range m.Header {
		if k != protocol.HeaderMsgID {
			h[k] = v
		}
	}
	h[protocol.HeaderJobID] = []string{id}
	if err := j.nc.PublishMsg(&nats.Msg{Subject: to, Header: h, Data: m.Data}); err != nil {
		j.log.Warn("cannot send result to "+protocol.HeaderReplyTo, zap.String("job", id), zap.String("subject", to), zap.Error(err))
	}
}
