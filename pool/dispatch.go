package pool

import (
	"container/list"
	"context"
	"sync"

	"github.com/pyfleet/pyfleet/call"
)

// dispatcher hands out the serving workers' free call slots. A call takes
// a slot and runs on its caller's own goroutine (Pool.run): when a slot is
// free, which is nearly always below the pool's capacity, taking it is a
// few instructions under mu and wakes no goroutine. Only a call that finds
// none waits, in order, and the call that frees a slot hands it over.
// (The pool used to run one goroutine per slot that took calls from a
// channel and answered on another: two goroutine hand-offs a call; see
// test/bench/notes.md, "A leaner node path".)
//
// Lock order: Pool.mu before mu, never the other way.
type dispatcher struct {
	mu      sync.Mutex
	workers []*worker // those open for calls, in the order they opened
	waiting list.List // of *waiter, first come first served
	next    int       // where the next search for the least busy worker starts
	perW    int       // slots a worker has (Config.Concurrency)
}

// waiter is a call waiting for a slot: of any worker, or of pinned's (a
// session's) only.
type waiter struct {
	pinned *worker
	got    chan *worker // buffered: the one who hands the slot never waits
	elem   *list.Element
}

// open makes w's slots available and hands them to the calls waiting for
// them. Called with Pool.mu held, once w serves.
func (d *dispatcher) open(w *worker) {
	d.mu.Lock()
	defer d.mu.Unlock()
	w.open, w.free = true, d.perW
	d.workers = append(d.workers, w)
	for e := d.waiting.Front(); e != nil && w.free > 0; {
		next := e.Next()
		if wt := e.Value.(*waiter); wt.pinned == nil || wt.pinned == w {
			w.free--
			w.slots.Add(1)
			d.hand(wt, w)
		}
		e = next
	}
}

// close takes w's free slots away: no call starts on w from now on, and
// those that took a slot already count in w.slots. Safe to call more than
// once, and for a worker never opened.
func (d *dispatcher) close(w *worker) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !w.open {
		return
	}
	w.open, w.free = false, 0
	for i, o := range d.workers {
		if o == w {
			d.workers = append(d.workers[:i], d.workers[i+1:]...)
			break
		}
	}
}

// hand gives wt the slot of w it waited for. Called with mu held.
func (d *dispatcher) hand(wt *waiter, w *worker) {
	d.waiting.Remove(wt.elem)
	wt.elem = nil
	wt.got <- w
}

// take returns a worker whose free slot the caller now holds, pinned's if
// pinned is set, else the least busy worker's; nil if none is free.
// Called with mu held.
func (d *dispatcher) take(pinned *worker) *worker {
	var best *worker
	if pinned != nil {
		if pinned.open && pinned.free > 0 {
			best = pinned
		}
	} else if n := len(d.workers); n > 0 {
		// The search starts one further each time, so that equally busy
		// workers take turns.
		d.next = (d.next + 1) % n
		for i := range n {
			w := d.workers[(d.next+i)%n]
			if best == nil || w.free > best.free {
				best = w
				if w.free == d.perW {
					break // idle: none can be less busy
				}
			}
		}
		if best.free == 0 {
			best = nil
		}
	}
	if best != nil {
		best.free--
		best.slots.Add(1)
	}
	return best
}

// release gives back the slot of w that a call held: to the first call
// waiting that may run on w, else to w's free slots.
func (d *dispatcher) release(w *worker) {
	d.mu.Lock()
	if w.open {
		for e := d.waiting.Front(); e != nil; e = e.Next() {
			if wt := e.Value.(*waiter); wt.pinned == nil || wt.pinned == w {
				d.hand(wt, w) // the slot changes hands and stays counted
				d.mu.Unlock()
				return
			}
		}
		w.free++
	}
	d.mu.Unlock()
	w.slots.Done()
}

// acquire returns a worker with a slot held for the call (pinned's, for a
// session), waiting in order until one is free or the call cannot run:
// its ctx ends (408), the pool closes (503), or the session's worker goes
// away (410).
func (p *Pool) acquire(ctx context.Context, pinned *worker, session string) (*worker, error) {
	d := &p.slots
	d.mu.Lock()
	if w := d.take(pinned); w != nil {
		d.mu.Unlock()
		return w, nil
	}
	wt := &waiter{pinned: pinned, got: make(chan *worker, 1)}
	wt.elem = d.waiting.PushBack(wt)
	d.mu.Unlock()

	var lost, retired <-chan struct{}
	if pinned != nil {
		lost, retired = pinned.lost, pinned.retire
	}
	var err error
	select {
	case w := <-wt.got:
		return w, nil
	case <-ctx.Done():
		err = call.Errorf(call.CodeDeadline, call.TypeDeadline, "the deadline passed while the call waited for a worker")
	case <-p.closed:
		err = call.Errorf(call.CodeUnavailable, call.TypeDraining, "the node stopped before a worker was free")
	case <-lost:
		err = sessionLost(session, pinned)
	case <-retired:
		err = sessionLost(session, pinned)
	}
	d.mu.Lock()
	if wt.elem != nil {
		d.waiting.Remove(wt.elem)
		d.mu.Unlock()
		return nil, err
	}
	d.mu.Unlock()
	// Handed a slot as it gave up: the next call may have it.
	d.release(<-wt.got)
	return nil, err
}
