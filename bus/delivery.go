package bus

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/protocol"
)

// jobIdentity is who a job is, read once from its subject, headers and
// stream sequence by identify, for a delivery and for the advisory of a job
// no node settled alike.
type jobIdentity struct {
	id        string // Nats-Msg-Id, or the stream sequence
	idNote    string // why id is not the job's Nats-Msg-Id, when it is not
	seq       uint64 // the job's sequence in the jobs stream
	subject   string
	function  string // the subject's token(s) after the pool, less a priority
	priority  string // the subject's priority token, or protocol.PriorityNormal
	requestID string // Pyfleet-Request-Id, or the id
	fired     bool   // a schedule produced the job (firedID)
	replyTo   string // Pyfleet-Reply-To if the node may publish to it, else ""
}

// msgID is the Nats-Msg-Id of what the node stores for the job (its result,
// its dead letter): the job's stream sequence makes it unique per
// submission and the same across redeliveries, so a second store of one
// run is dropped.
func (who jobIdentity) msgID() string {
	return who.id + ":" + strconv.FormatUint(who.seq, 10)
}

// delivery is one delivery of a job being handled: what the fetch loop got,
// who the job is, and the lease kept on it.
type delivery struct {
	jobIdentity
	msg       jetstream.Msg
	n         uint64 // which delivery this is: 1 for the first
	hdr       nats.Header
	submitted time.Time // when the jobs stream stored the job
	log       *zap.Logger
	stopLease func()
	status    statusMemo // what this delivery last wrote to its status

	// stopMu guards stopRun and cancelled, set by the run and by a cancel
	// message, which come from different goroutines.
	stopMu    sync.Mutex
	stopRun   context.CancelCauseFunc // nil until the call starts
	cancelled bool

	// progressMu guards the job's last ctx.progress value and what of it
	// its status has (Jobs.progress, saveProgress).
	progressMu         sync.Mutex
	progressLast       []byte
	progressSaved      time.Time
	progressSavedValue []byte
}

// errCancelled is the cause of a job's context when the job was cancelled.
var errCancelled = errors.New("the job was cancelled")

// runWith makes stop the way to cancel d's call, and calls it at once if a
// cancel came first.
func (d *delivery) runWith(stop context.CancelCauseFunc) {
	d.stopMu.Lock()
	defer d.stopMu.Unlock()
	d.stopRun = stop
	if d.cancelled {
		stop(errCancelled)
	}
}

// cancel stops d's call, now or as soon as it starts.
func (d *delivery) cancel() {
	d.stopMu.Lock()
	defer d.stopMu.Unlock()
	d.cancelled = true
	if d.stopRun != nil {
		d.stopRun(errCancelled)
	}
}

// identify reads who a job is, using no value the node could not carry
// safely. The id goes into the subjects and headers of the job's result
// and dead letter, so a Nats-Msg-Id that is not a safe header value
// (checkHeaders) gives way to the stream sequence, and idNote says so for
// the dead letter; a bad request id gives way to the id, and a Reply-To the
// node may not publish to is never used.
func (j *Jobs) identify(subject string, hdr nats.Header, seq uint64) jobIdentity {
	who := jobIdentity{seq: seq, subject: subject}
	who.function, who.priority = protocol.SplitJobFunction(strings.TrimPrefix(subject, j.subj.Job(j.cfg.Pool, "")))
	who.id = protocol.Header(hdr, protocol.HeaderMsgID)
	if who.id != "" && !safeHeader(protocol.HeaderMsgID, who.id) {
		who.idNote = fmt.Sprintf("; the job is named by its stream sequence %d instead", seq)
		who.id = ""
	}
	if who.id == "" {
		who.id, who.fired = firedID(hdr, seq)
	}
	who.requestID = protocol.Header(hdr, protocol.HeaderRequestID)
	if who.requestID == "" || !safeHeader(protocol.HeaderRequestID, who.requestID) {
		who.requestID = who.id
	}
	who.replyTo = protocol.Header(hdr, protocol.HeaderReplyTo)
	if who.replyTo != "" && j.checkReplyTo(who.replyTo) != nil {
		who.replyTo = ""
	}
	return who
}

// newDelivery reads who the job of msg is and which delivery this is.
func (j *Jobs) newDelivery(msg jetstream.Msg) (*delivery, error) {
	meta, err := msg.Metadata()
	if err != nil {
		return nil, err
	}
	hdr := msg.Headers()
	d := &delivery{jobIdentity: j.identify(msg.Subject(), hdr, meta.Sequence.Stream), msg: msg, n: meta.NumDelivered, hdr: hdr,
		submitted: meta.Timestamp.UTC()}
	d.log = j.log.With(zap.String("job", d.id), zap.String("function", d.function), zap.Uint64("delivery", d.n),
		zap.String("priority", d.priority))
	return d, nil
}

// safeHeader reports whether v passes checkHeaders as the value of name.
func safeHeader(name, v string) bool {
	return checkHeaders(nats.Header{name: {v}}) == nil
}

// admit refuses, before anything else, a job whose headers say it can never
// run: no such job reaches a worker or is delivered again.
func (j *Jobs) admit(d *delivery) *call.Error {
	if e := checkHeaders(d.hdr); e != nil {
		e.Message += d.idNote
		return e
	}
	if err := protocol.ValidToken(d.id); err != nil {
		return call.Errorf(call.CodeBadRequest, call.TypeInvalidJobID, "job id (%s) cannot be a subject token: %v", protocol.HeaderMsgID, err)
	}
	if to := protocol.Header(d.hdr, protocol.HeaderReplyTo); to != "" {
		return j.checkReplyTo(to)
	}
	return nil
}

// checkReplyTo refuses a Pyfleet-Reply-To that is not a plain subject (a
// wildcard, an empty token) or that lies where a message means more than a
// result to whoever reads it: in <prefix>.result.> it would be stored as
// another job's result, in .job.> run as a job, in .evt.> and .dead.> read
// as an event or a dead letter, and in $JS.>, $KV.>, $O.> or $SYS.> taken
// as a JetStream API call, a key, an object or a system request.
func (j *Jobs) checkReplyTo(to string) *call.Error {
	if e := checkHeaders(nats.Header{protocol.HeaderReplyTo: {to}}); e != nil {
		return e
	}
	for _, tok := range strings.Split(to, ".") {
		if err := protocol.ValidToken(tok); err != nil {
			return call.Errorf(call.CodeBadRequest, call.TypeBadRequest, "header %s: %q is not a subject a result can be sent to: %v", protocol.HeaderReplyTo, to, err)
		}
	}
	for _, root := range j.noReplyTo {
		if to == root || strings.HasPrefix(to, root+".") {
			return call.Errorf(call.CodeBadRequest, call.TypeBadRequest, "header %s: %q is inside %s.>, where the node sends no results", protocol.HeaderReplyTo, to, root)
		}
	}
	return nil
}

// noReplyTo lists the subject trees checkReplyTo keeps results out of.
func noReplyTo(sub protocol.Subjects) []string {
	p := sub.Root()
	return []string{p + ".result", p + ".job", p + ".evt", p + ".dead", p + ".cancel", p + ".sched", "$JS", "$KV", "$O", "$SYS"}
}

// jobTimeout reads a job's Pyfleet-Timeout by the same rule as a call's.
func (j *Jobs) jobTimeout(h nats.Header) (time.Duration, *call.Error) {
	return checkTimeout(h, j.cfg.DefaultTimeout, j.cfg.MaxTimeout)
}

// maxResult is the largest result a job may have: MaxResultBytes, and never
// more than the connection's max payload, since a larger one cannot be
// stored.
func (j *Jobs) maxResult() int {
	limit := j.cfg.MaxResultBytes
	if mp := int(j.nc.MaxPayload()); mp > 0 && (limit <= 0 || limit > mp) {
		limit = mp
	}
	if limit <= 0 {
		limit = 1 << 20 // not connected yet: the NATS default max payload
	}
	return limit
}

// keepLease renews d's lease on its job every AckWait/3 until the returned
// func is called; that func may be called more than once and returns once
// no renewal can follow.
func (j *Jobs) keepLease(d *delivery) func() {
	return every(j.cfg.AckWait/3, func() {
		if err := d.msg.InProgress(); err != nil {
			d.log.Warn("renew job lease", zap.Error(err))
		}
	})
}
