package pool

import (
	"sync"
	"time"

	"github.com/pyfleet/pyfleet/proto/workerpb"
)

// maxHold bounds how long a frame waits for the worker to answer the last
// message before it is sent anyway (see outbox.push).
const maxHold = 2 * time.Millisecond

// batchBytes bounds the payload bytes of one CallBatch (which holds at
// least one frame): batching is for small frames.
const batchBytes = 1 << 20

// batchStream is a worker's Batches stream. Only the worker's recv
// goroutine receives; senders take sendMu, because gRPC allows one sender at
// a time: the outbox's flusher, and stopProcess closing the stream.
type batchStream struct {
	workerpb.Worker_BatchesClient
	sendMu sync.Mutex
}

func (s *batchStream) send(b *workerpb.CallBatch) error {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	return s.Send(b)
}

func (s *batchStream) closeSend() {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	_ = s.CloseSend()
}

// outbox holds the frames on their way to one worker. Any goroutine may push
// (the calls, a cancel); the one that finds no one sending becomes
// the flusher and sends until the queue is empty; the worker's recv
// goroutine calls answered, the hold timer's goroutine holdExpired. mu
// guards every field below it.
type outbox struct {
	stream *batchStream
	lost   func(error) // a send failed: the stream is gone

	mu         sync.Mutex
	frames     []*workerpb.Call // waiting to be sent
	sending    bool             // a goroutine is in flush's loop and will send frames
	unanswered bool             // a message went out and no result has come back since
	held       bool             // hold is armed
	hold       *time.Timer      // flushes held frames when the worker takes too long to answer
}

// push queues c to be sent and sees that it is. In Python each gRPC message
// costs the worker far more than the frames in it, so frames travel
// together when they can, without making a lone one wait:
//
//   - If the worker has answered (sent results) since the last message went
//     out, or nothing went out yet, the frame goes at once, with any others
//     queued: an idle worker gets each call without delay.
//   - Otherwise the worker is busy with what it got, and could not read the
//     frame before it answers anyway: the frame waits for that answer (recv
//     sends what waits as one message when results come), or for maxHold,
//     whichever is first, in case the worker is busy with long calls.
//   - While a goroutine sends, frames queue up and it sends them next.
//
// A nil error means the frame was sent or will be; if a send fails the
// stream is lost, and every call learns it from the worker's lost.
func (o *outbox) push(c *workerpb.Call) error {
	o.mu.Lock()
	o.frames = append(o.frames, c)
	if o.sending {
		o.mu.Unlock()
		return nil
	}
	if o.unanswered {
		if !o.held {
			o.held = true
			if o.hold == nil {
				o.hold = time.AfterFunc(maxHold, o.holdExpired)
			} else {
				o.hold.Reset(maxHold)
			}
		}
		o.mu.Unlock()
		return nil
	}
	return o.flush()
}

// answered is called by recv when results came: frames held for them go.
func (o *outbox) answered() {
	o.mu.Lock()
	o.unanswered = false
	if o.sending || len(o.frames) == 0 {
		o.mu.Unlock()
		return
	}
	_ = o.flush()
}

func (o *outbox) holdExpired() {
	o.mu.Lock()
	o.held = false
	if o.sending || len(o.frames) == 0 {
		o.mu.Unlock()
		return
	}
	_ = o.flush()
}

// flush sends the queued frames as one message, and again while more queue
// up meanwhile. It is called with mu held and releases it.
func (o *outbox) flush() error {
	o.sending = true
	if o.held {
		o.held = false
		o.hold.Stop()
	}
	var err error
	for len(o.frames) > 0 {
		n, size := 0, 0
		for n < len(o.frames) && (n == 0 || size+len(o.frames[n].Payload) <= batchBytes) {
			size += len(o.frames[n].Payload)
			n++
		}
		// Fresh slices: gRPC may still hold the last message.
		batch := &workerpb.CallBatch{Calls: o.frames[:n:n]}
		o.frames = append(make([]*workerpb.Call, 0, max(cap(o.frames), 1)), o.frames[n:]...)
		o.unanswered = true
		o.mu.Unlock()
		err = o.stream.send(batch)
		o.mu.Lock()
		if err != nil {
			o.frames = nil
			break
		}
	}
	o.sending = false
	o.mu.Unlock()
	if err != nil {
		o.lost(err)
	}
	return err
}
