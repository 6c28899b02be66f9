package pool

import (
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/lifecycle"
	"github.com/pyfleet/pyfleet/proto/workerpb"
)

// asyncCall is a call StartCall started: no goroutine waits for it. Its end
// comes to it from whichever goroutine hears of it first: recv with the
// END (result), markLost (lost), its timer (the deadline, then the end of
// the grace), or Cancel. It runs the call as execution does, with the same
// outcomes, and holds its worker's slot until the END or the loss.
type asyncCall struct {
	p    *Pool
	w    *worker
	id   uint64
	req  *call.Request
	done func(call.Result, error)

	mu       sync.Mutex
	answered bool        // done was called
	overran  bool        // cancelled (deadline or Cancel); the grace runs
	ended    bool        // END or loss: the slot is given back
	timer    *time.Timer // the deadline's, then the grace's; counted in p.goroutines while armed
}

// StartCall starts req on a free worker slot, if one is free now; see
// call.Starter. A session's later calls start on the session's worker, if
// it has a slot free. Left to Call: calls that may wait (no free slot), a
// session's first call (the queue must admit it before it binds the
// session) and the calls of a session whose worker is gone (410).
func (p *Pool) StartCall(req *call.Request, done func(call.Result, error)) (call.Running, bool) {
	if req.Deadline.IsZero() || notUTF8(req) != "" {
		return nil, false // Call answers these, or refuses them
	}
	if _, ok := p.lookup(req.Function); !ok {
		return nil, false
	}
	if !p.enter() {
		return nil, false
	}
	var pinned *worker
	if req.Session != "" {
		if pinned = p.boundSession(req.Session); pinned == nil {
			p.leave()
			return nil, false
		}
	}
	d := &p.slots
	d.mu.Lock()
	w := d.take(pinned)
	d.mu.Unlock()
	if w == nil {
		p.leave()
		return nil, false
	}
	p.busy.Add(1)
	w.inflight.Add(1)
	a := &asyncCall{p: p, w: w, id: w.nextID.Add(1), req: req, done: done}
	frame := &workerpb.Call{Id: a.id, Function: req.Function, Payload: req.Payload,
		RequestId: req.RequestID, Session: req.Session, JobId: req.JobID, Attempt: uint32(max(req.Attempt, 1)),
		TimeoutMs: timeoutMs(time.Until(req.Deadline))}
	// Armed before the frame goes, so that the call's end, which may come
	// at once, always finds it.
	a.mu.Lock()
	a.arm(time.Until(req.Deadline), a.deadlinePassed)
	a.mu.Unlock()
	if err := w.beginAsync(frame, a); err != nil {
		a.mu.Lock()
		a.ended = true
		a.disarm()
		a.mu.Unlock()
		a.end()
		a.answer(outcome{err: lostError(w)})
	}
	return a, true
}

// arm starts the timer that calls f after d. Called with mu held.
func (a *asyncCall) arm(d time.Duration, f func()) {
	a.p.goroutines.Add(1)
	a.timer = time.AfterFunc(d, func() {
		defer a.p.goroutines.Done()
		f()
	})
}

// disarm stops the timer, if it has not fired. Called with mu held.
func (a *asyncCall) disarm() {
	if a.timer != nil && a.timer.Stop() {
		a.p.goroutines.Done()
	}
	a.timer = nil
}

// answer gives the caller its outcome, once.
func (a *asyncCall) answer(o outcome) {
	a.mu.Lock()
	first := !a.answered
	a.answered = true
	a.mu.Unlock()
	if first {
		a.p.leave()
		a.done(o.res, o.err)
	}
}

// end gives the slot back, once the call is over in the worker.
func (a *asyncCall) end() {
	a.w.inflight.Add(-1)
	a.p.busy.Add(-1)
	a.p.slots.release(a.w)
}

// result takes one result of the call, on recv's goroutine.
func (a *asyncCall) result(r *workerpb.Result) {
	w, p := a.w, a.p
	switch r.Kind {
	case workerpb.Result_PROGRESS:
		// To the caller while it listens, as Call's progress goes: not
		// once it has its answer (408 at the deadline, a cancel).
		a.mu.Lock()
		answered := a.answered
		a.mu.Unlock()
		if a.req.Progress != nil && !answered {
			a.req.Progress(r.Payload)
		}
		return
	case workerpb.Result_CHUNK:
		// The function does not stream (StartCall takes only calls that
		// do not): as Call's emit would, the call is cancelled.
		w.cancel(a.id)
		return
	}
	a.mu.Lock()
	if a.ended {
		a.mu.Unlock()
		return
	}
	a.ended = true
	a.disarm()
	a.mu.Unlock()
	if n := w.handled.Add(1); w.maxRequests > 0 && n >= w.maxRequests {
		w.askRecycle("requests")
	}
	p.handled.Add(1)
	var o outcome
	if r.Error != nil {
		p.errors.Add(1)
		o.err = &call.Error{Code: int(r.Error.Code), Type: r.Error.Type, Message: r.Error.Message, Worker: w.name}
	} else {
		o.res = call.Result{Worker: w.name, Data: r.Payload}
	}
	a.end()
	a.answer(o)
}

// lost ends the call when its worker's channel broke, from markLost.
func (a *asyncCall) lost() {
	a.mu.Lock()
	if a.ended {
		a.mu.Unlock()
		return
	}
	a.ended = true
	a.disarm()
	overran := a.overran
	a.mu.Unlock()
	a.p.errors.Add(1)
	a.end()
	if overran {
		a.answer(outcome{err: deadlineError(a.w.name)}) // answered already, as a rule
	} else {
		a.answer(outcome{err: lostError(a.w)})
	}
}

// Cancel ends the call as a cancelled ctx ends Call: 408 at once, a cancel
// frame, and the worker replaced if the call outlives the grace.
func (a *asyncCall) Cancel() {
	a.overrun()
}

func (a *asyncCall) deadlinePassed() {
	a.overrun()
}

// overrun answers 408, cancels the call in the worker and starts the
// grace, once.
func (a *asyncCall) overrun() {
	a.mu.Lock()
	if a.ended || a.overran {
		a.mu.Unlock()
		return
	}
	a.overran = true
	a.disarm()
	a.arm(a.p.cfg.DeadlineGrace, a.graceOver)
	a.mu.Unlock()
	a.w.cancel(a.id)
	a.answer(outcome{err: call.Errorf(call.CodeDeadline, call.TypeDeadline, "the deadline passed before the call finished")})
}

// graceOver kills the worker of a call that outlived its grace: a sync
// Python function cannot be interrupted any other way. The loss ends the
// call.
func (a *asyncCall) graceOver() {
	a.mu.Lock()
	ended := a.ended
	a.timer = nil
	a.mu.Unlock()
	if ended {
		return
	}
	a.p.log.Warn("call overran its deadline or cancel; killing its worker",
		zap.String("worker", a.w.name), zap.String("function", a.req.Function), zap.String("request_id", a.req.RequestID))
	a.w.stopProcess(lifecycle.ReasonDeadline, 0)
}
