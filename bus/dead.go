package bus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"
	"unicode/utf8"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/protocol"
)

// maxStoredError bounds the message of an error in a dead letter or a stored
// result when the whole one does not fit: an exception's message may quote
// the whole payload.
const maxStoredError = 4096

// bury dead-letters d with its last error and terminates it. The job ends
// here whenever its dead letter or at least its error result is stored.
// When neither is, a job that might still succeed goes back to the stream;
// one that never can (permanent) is terminated all the same, since another
// delivery would only fail, and fail to bury, again.
func (j *Jobs) bury(d *delivery, e *call.Error) {
	d.log.Warn("job dead-lettered", zap.Int("code", e.Code), zap.String("type", e.Type), zap.String("error", e.Message))
	deadErr, resErr := j.publishDead(d.jobIdentity, d.n, d.msg.Data(), e)
	switch {
	case deadErr == nil:
	case resErr == nil:
		d.log.Error("cannot publish the dead letter; the job ends with its error stored as its result", zap.Error(deadErr))
	case !permanent(e):
		d.log.Error("cannot publish the dead letter nor store the error; the job will be delivered again",
			zap.NamedError("dead_letter", deadErr), zap.NamedError("result", resErr))
		j.statusEnd(d.jobIdentity, &d.status, d.n, protocol.JobRetrying, "", e, true)
		j.retry(d)
		return
	default:
		d.log.Error("cannot publish the dead letter nor store the error of a job that can never succeed; the job is dropped",
			zap.Int("code", e.Code), zap.String("error", e.Message), zap.NamedError("dead_letter", deadErr), zap.NamedError("result", resErr))
	}
	d.stopLease()
	if err := d.msg.TermWithReason(fmt.Sprintf("%d %s", e.Code, e.Type)); err != nil {
		d.log.Warn("terminate job", zap.Error(err))
	}
	j.statusEnd(d.jobIdentity, &d.status, d.n, deadState(e), "", e, true)
	j.outcome("dead")
}

// publishDead publishes a job with its last error to
// <prefix>.dead.<pool>.<function>, stores that error as the job's result
// and sends it to the job's Reply-To, so that whoever waits for the job
// learns its end; it returns why the dead letter, and why the result, could
// not be stored. An error too large to store is cut short.
func (j *Jobs) publishDead(who jobIdentity, deliveries uint64, payload []byte, e *call.Error) (deadErr, resErr error) {
	short := shortError(e, maxStoredError)
	deadErr = j.publishDeadLetter(who, deliveries, payload, e, short)
	res, resErr := j.storeError(who, e, short)
	j.forwardTo(who.replyTo, who.id, res)
	return deadErr, resErr
}

// publishDeadLetter publishes the dead letter of a job with error e. One too
// large to publish is published with short, the error cut short, and only
// the start of the payload, or none of it (DeadJob.PayloadTruncated).
func (j *Jobs) publishDeadLetter(who jobIdentity, deliveries uint64, payload []byte, e, short *call.Error) error {
	h, _ := errorMsg(e, j.cfg.Node, who.requestID)
	h[protocol.HeaderJobID] = []string{who.id}
	h[protocol.HeaderMsgID] = []string{who.msgID()}
	dead := &nats.Msg{Subject: j.subj.Dead(j.cfg.Pool, deadFunction(who.function)), Header: h}
	job := protocol.DeadJob{ID: who.id, Subject: who.subject, Seq: who.seq, Deliveries: deliveries}
	var err error
	for _, try := range []struct {
		e    *call.Error
		keep int // bytes of the payload; -1 all
	}{{e, -1}, {short, j.payloadRoom(dead, short, job, payload)}, {short, 0}} {
		dead.Data = deadBody(try.e, job, payload, try.keep)
		err = j.jsPublish(dead)
		if r := refusal(err, j.nc); r == nil || !r.tooLarge {
			break
		}
		j.log.Warn("dead letter too large; publishing it with less of the payload", zap.String("job", who.id),
			zap.Int("bytes", len(dead.Data)), zap.Error(err))
	}
	return err
}

// storeError stores error e, or short if e is too large, as the job's
// result, and returns the result as stored, or as it would have been.
func (j *Jobs) storeError(who jobIdentity, e, short *call.Error) (*nats.Msg, error) {
	if err := protocol.ValidToken(who.id); err != nil {
		res := &nats.Msg{}
		res.Header, res.Data = errorMsg(short, j.cfg.Node, who.requestID)
		return res, fmt.Errorf("no result stored: %w", err)
	}
	var res *nats.Msg
	var err error
	for _, ee := range []*call.Error{e, short} {
		res = &nats.Msg{}
		res.Header, res.Data = errorMsg(ee, j.cfg.Node, who.requestID)
		err = j.storeResult(who, res)
		var ce *call.Error
		if err == nil || !errors.As(err, &ce) || ce.Code != call.CodeTooLarge {
			break
		}
	}
	if err != nil {
		j.log.Warn("cannot store the error as the job's result", zap.String("job", who.id), zap.Error(err))
	}
	return res, err
}

// payloadRoom is how many bytes of payload fit in a dead letter m of job
// with error e without going over the max payload.
func (j *Jobs) payloadRoom(m *nats.Msg, e *call.Error, job protocol.DeadJob, payload []byte) int {
	room := int(j.nc.MaxPayload()) - headerBytes(m.Header) - len(deadBody(e, job, payload, 0)) - 64
	// PayloadBytes is base64 in JSON: 4 bytes for every 3.
	return max(room/4*3, 0)
}

// shortError returns e with its message cut to about n bytes.
func shortError(e *call.Error, n int) *call.Error {
	if len(e.Message) <= n {
		return e
	}
	c := *e
	cut := n
	for cut > 0 && !utf8.RuneStart(c.Message[cut]) {
		cut--
	}
	c.Message = fmt.Sprintf("%s… (%d bytes in all)", c.Message[:cut], len(e.Message))
	return &c
}

// deadFunction keeps the dead-letter subject one token long even for a job
// published to pool.a.b, which has no function name.
func deadFunction(f string) string {
	if protocol.ValidToken(f) != nil {
		return "_invalid"
	}
	return f
}

// deadBody is the dead letter of job with error e and keep bytes of its
// payload, or all of it when keep is negative.
func deadBody(e *call.Error, job protocol.DeadJob, payload []byte, keep int) []byte {
	switch {
	case keep >= 0 && keep < len(payload):
		job.PayloadBytes = payload[:keep]
		job.PayloadTruncated = true
		job.PayloadSize = len(payload)
	case json.Valid(payload):
		job.Payload = payload
	default:
		job.PayloadBytes = payload
	}
	b, _ := json.Marshal(protocol.DeadLetter{
		Error: protocol.ErrorDetail{Code: e.Code, Type: e.Type, Message: e.Message},
		Job:   job,
	})
	return b
}

// maxDeliveries handles the server's advisory that a job reached
// MaxDeliver without being settled: its node died (or stopped) during the
// last delivery, so no node dead-lettered it and the work queue would keep
// it forever, unseen.
func (j *Jobs) maxDeliveries(m *nats.Msg) {
	var adv struct {
		Stream     string `json:"stream"`
		Consumer   string `json:"consumer"`
		StreamSeq  uint64 `json:"stream_seq"`
		Deliveries uint64 `json:"deliveries"`
	}
	if err := json.Unmarshal(m.Data, &adv); err != nil || adv.StreamSeq == 0 {
		j.log.Warn("unreadable max-deliveries advisory", zap.ByteString("advisory", m.Data))
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	jobs := j.state.Load().jobs
	raw, err := jobs.GetMsg(ctx, adv.StreamSeq)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return // settled after all
	}
	if err != nil {
		j.log.Error("cannot read job that reached its delivery limit", zap.Uint64("seq", adv.StreamSeq), zap.Error(err))
		return
	}
	who := j.identify(raw.Subject, raw.Header, adv.StreamSeq)
	e := call.Errorf(call.CodeFailed, call.TypeDeliveryLimit, "no node finished the job in %d deliveries (its node stopped or died during the last one)", adv.Deliveries)
	if deadErr, resErr := j.publishDead(who, adv.Deliveries, raw.Data, e); deadErr != nil && resErr != nil {
		// Left in the stream, where an operator can still see it.
		j.log.Error("cannot publish dead letter nor store the error", zap.String("job", who.id),
			zap.NamedError("dead_letter", deadErr), zap.NamedError("result", resErr))
		return
	}
	if err := jobs.DeleteMsg(ctx, adv.StreamSeq); err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
		j.log.Warn("cannot remove dead-lettered job from the stream", zap.String("job", who.id), zap.Error(err))
	}
	j.statusEnd(who, nil, adv.Deliveries, protocol.JobDead, "", e, false)
	j.log.Warn("job dead-lettered after its delivery limit", zap.String("job", who.id), zap.String("function", who.function))
}

// deadState is the status of a job dead-lettered with e: failed when it
// could never succeed, dead when it used up its deliveries.
func deadState(e *call.Error) string {
	if permanent(e) {
		return protocol.JobFailed
	}
	return protocol.JobDead
}
