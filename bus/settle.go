package bus

import (
	"context"
	"encoding/json"
	"errors"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/protocol"
)

// handle settles one delivery. The order is the at-least-once contract: the
// result is stored (and its store acknowledged) before the job is acked, so
// a node that dies in between leaves a job that the next delivery finds
// done and acks without running it again.
func (j *Jobs) handle(msg jetstream.Msg) {
	var admitted sync.Once
	started := func() { admitted.Do(j.started) }
	defer started()

	d, err := j.newDelivery(msg)
	if err != nil {
		j.log.Error("job without JetStream metadata; terminated", zap.String("subject", msg.Subject()), zap.Error(err))
		_ = msg.Term()
		return
	}
	// The lease is kept from the first moment: the lookup below and the
	// queue in the pool both take time.
	d.stopLease = j.keepLease(d)
	defer d.stopLease()
	defer j.track(d)()

	fn, timeout, settled := j.prepare(d)
	if settled {
		return
	}
	if !j.statusRunning(d) {
		d.log.Info("job cancelled before it ran")
		j.settleCancelled(d, "")
		return
	}
	res, limit, settled := j.invoke(d, fn, timeout, started)
	if settled {
		return
	}
	j.finish(d, res, limit)
}

// prepare settles at once a delivery that must not run: a job that can
// never run (admit, no such function, a bad timeout or body) is buried, one
// whose result is already stored is acked. Otherwise it returns the
// function and the job's timeout.
func (j *Jobs) prepare(d *delivery) (fn call.Function, timeout time.Duration, settled bool) {
	if e := j.admit(d); e != nil {
		j.bury(d, e)
		return fn, 0, true
	}
	if done, err := j.storedResult(d); err != nil {
		d.log.Warn("cannot look up a stored result; running the job", zap.Error(err))
	} else if done != nil {
		d.log.Info("result already stored; acked without running")
		j.forward(d, done)
		j.ack(d)
		j.statusEnd(d.jobIdentity, &d.status, d.n, protocol.JobDone, protocol.Header(done.Header, protocol.HeaderWorker), nil, true)
		j.outcome("duplicate")
		return fn, 0, true
	}
	fn, ok := j.funcs[d.function]
	if !ok {
		j.bury(d, call.Errorf(call.CodeNotFound, call.TypeNotFound, "no function %q in pool %q", d.function, j.cfg.Pool))
		return fn, 0, true
	}
	timeout, e := j.jobTimeout(d.hdr)
	if e == nil && !fn.Raw {
		e = checkJSON(d.msg.Data())
	}
	if e != nil {
		j.bury(d, e)
		return fn, 0, true
	}
	return fn, timeout, false
}

// invoke makes the job's call and returns its result, a streamed job's
// items joined into one, with the largest result the job may store. A call
// that failed settles the delivery: buried or retried by failed, or handed
// back when Stop cut it short.
func (j *Jobs) invoke(d *delivery, fn call.Function, timeout time.Duration, admitted func()) (res call.Result, limit int, settled bool) {
	req := &call.Request{
		Function:  fn.Name,
		Payload:   d.msg.Data(),
		Session:   protocol.Header(d.hdr, protocol.HeaderSession),
		RequestID: d.requestID,
		Deadline:  time.Now().Add(timeout),
		JobID:     d.id,
		Attempt:   int(d.n),
		Progress:  func(v []byte) { j.progress(d, v) },
		Admitted:  admitted,
	}
	run, stopRun := context.WithCancelCause(j.abortCtx)
	defer stopRun(nil)
	d.runWith(stopRun)
	ctx, cancel := context.WithDeadline(run, req.Deadline)
	defer cancel()
	col := &collector{raw: fn.Raw, limit: j.maxResult()}
	emit := func(ch call.Chunk) error {
		if err := col.add(ch); err != nil {
			// The result is lost already: stop the worker's
			// generator rather than let it stream to the deadline.
			cancel()
			return err
		}
		return nil
	}
	res, err := j.h.Call(ctx, req, emit)
	j.saveProgress(d) // the last value, before the status says how the job ended
	switch e := col.failure(); {
	case e != nil:
		// Whatever the cancelled call returned, this is why it ended;
		// a 413 is permanent.
		j.bury(d, e)
		return res, 0, true
	case err != nil && errors.Is(context.Cause(run), errCancelled):
		d.log.Info("running job cancelled")
		j.settleCancelled(d, res.Worker)
		return res, 0, true
	case err != nil && j.abortCtx.Err() != nil:
		d.log.Info("job cut short by stop; handed back")
		d.stopLease()
		// The status first: the next delivery's "running" must not be
		// written over.
		j.statusEnd(d.jobIdentity, &d.status, d.n, protocol.JobPending, "", nil, true)
		_ = d.msg.Nak()
		return res, 0, true
	case err != nil:
		e := callError(ctx, err, timeout, j.cfg.Node)
		if e.Code == call.CodeFailed && e.Type == call.TypeInternal {
			d.log.Error("job failed", zap.Error(err))
		}
		j.failed(d, e)
		return res, 0, true
	}
	if fn.Stream {
		// A job has one result: the chunks as a JSON array, or end to
		// end for a raw function.
		res.Data = col.join()
		if res.Worker == "" {
			res.Worker = col.worker
		}
	}
	return res, col.limit, false
}

// finish stores the result of a call that succeeded, forwards it and acks
// the job; a result that can never be stored buries the job, a store that
// failed otherwise leaves it to run again.
func (j *Jobs) finish(d *delivery, res call.Result, limit int) {
	if len(res.Data) > limit {
		e := call.Errorf(call.CodeTooLarge, call.TypeTooLarge, "result of %d bytes is over the limit of %d bytes", len(res.Data), limit)
		e.Worker = res.Worker
		j.bury(d, e)
		return
	}
	out := &nats.Msg{Header: replyHeader(protocol.StatusOK, j.cfg.Node, res.Worker, d.requestID), Data: res.Data}
	if err := j.storeResult(d.jobIdentity, out); err != nil {
		var e *call.Error
		if errors.As(err, &e) {
			// Too large, or a stream that refuses it: running the job
			// again would end the same way.
			e.Worker = res.Worker
			j.bury(d, e)
			return
		}
		d.log.Error("cannot store result; the job will run again", zap.Error(err))
		j.statusEnd(d.jobIdentity, &d.status, d.n, protocol.JobRetrying, res.Worker,
			call.Errorf(call.CodeFailed, call.TypeInternal, "cannot store the result: %v", err), true)
		j.retry(d)
		return
	}
	j.statusEnd(d.jobIdentity, &d.status, d.n, protocol.JobDone, res.Worker, nil, true)
	j.forward(d, out)
	j.ack(d)
	j.outcome("acked")
}

// failed settles a job whose call failed: at once to the dead letters when
// it can never succeed (the request itself is wrong), after the last
// delivery otherwise, and back to the stream with a delay before that.
func (j *Jobs) failed(d *delivery, e *call.Error) {
	maxDeliver := j.state.Load().maxDeliver
	if permanent(e) || (maxDeliver > 0 && d.n >= uint64(maxDeliver)) {
		j.bury(d, e)
		return
	}
	d.log.Info("job failed; will be delivered again", zap.Int("code", e.Code), zap.String("type", e.Type), zap.String("error", e.Message))
	j.statusEnd(d.jobIdentity, &d.status, d.n, protocol.JobRetrying, "", e, true)
	j.retry(d)
}

// permanent reports whether a job that failed with e would fail the same way
// every time.
func permanent(e *call.Error) bool {
	return e.Code == call.CodeBadRequest || e.Code == call.CodeNotFound || e.Code == call.CodeTooLarge || e.Type == call.TypeResultRefused
}

func (j *Jobs) retry(d *delivery) {
	d.stopLease()
	var delay time.Duration
	if i := min(int(d.n)-1, len(j.cfg.BackOff)-1); i >= 0 {
		delay = j.cfg.BackOff[i]
	}
	if err := d.msg.NakWithDelay(delay); err != nil {
		d.log.Warn("nak job", zap.Error(err))
	}
	j.outcome("redelivered")
}

func (j *Jobs) outcome(what string) {
	if j.cfg.Outcome != nil {
		j.cfg.Outcome(what)
	}
}

func (j *Jobs) ack(d *delivery) {
	d.stopLease()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// DoubleAck: the job has left the stream once Running no longer
	// counts it. If the ack is lost, the next delivery finds the result.
	if err := d.msg.DoubleAck(ctx); err != nil {
		d.log.Warn("ack job", zap.Error(err))
	}
}

// settleCancelled ends a cancelled job: its result is a 499 Cancelled
// error, so that whoever waits for it learns why, and it is terminated
// without a dead letter (nothing failed). Its status says cancelled
// already: the client wrote it.
func (j *Jobs) settleCancelled(d *delivery, worker string) {
	e := call.Errorf(call.CodeCancelled, call.TypeCancelled, "the job was cancelled")
	e.Worker = worker
	res, err := j.storeError(d.jobIdentity, e, e)
	if err == nil {
		j.forward(d, res)
	}
	d.stopLease()
	if err := d.msg.TermWithReason("499 Cancelled"); err != nil {
		d.log.Warn("terminate job", zap.Error(err))
	}
	j.outcome("cancelled")
}

// progress publishes a running job's ctx.progress value on
// <prefix>.progress.<pool>.<job id> (protocol.Subjects.Progress), for
// whoever watches the job live; best effort, as a lost value is replaced by
// the next. The job's status (job.progress()) gets it too, at most once per
// progressSaveEvery, a key-value round trip each; saveProgress stores the
// last one when the call ends.
func (j *Jobs) progress(d *delivery, value []byte) {
	m := &nats.Msg{Subject: j.subj.Progress(j.cfg.Pool, d.id), Data: value,
		Header: nats.Header{protocol.HeaderJobID: {d.id}, protocol.HeaderNode: {j.cfg.Node}}}
	if err := j.nc.PublishMsg(m); err != nil {
		d.log.Debug("publish job progress", zap.Error(err))
	}
	d.progressMu.Lock()
	d.progressLast = append(d.progressLast[:0], value...)
	due := time.Since(d.progressSaved) >= progressSaveEvery
	d.progressMu.Unlock()
	if due {
		j.saveProgress(d)
	}
}

// progressSaveEvery is how often, at most, a running job's progress is
// written to its status.
const progressSaveEvery = time.Second

// saveProgress writes d's last progress value to its status, if it has one
// not written yet.
func (j *Jobs) saveProgress(d *delivery) {
	d.progressMu.Lock()
	if d.progressLast == nil || !d.progressSaved.IsZero() && string(d.progressLast) == string(d.progressSavedValue) {
		d.progressMu.Unlock()
		return
	}
	value := append(json.RawMessage(nil), d.progressLast...)
	d.progressSaved, d.progressSavedValue = time.Now(), value
	d.progressMu.Unlock()
	j.Progress(d.id, value)
}
