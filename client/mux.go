package client

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
)

// errClosed is what a call waiting on an inbox gets when the client or its
// connection closes.
var errClosed = errors.New("connection closed")

// errSilent is what a wait returns when its loss deadline passed first.
var errSilent = errors.New("no message in time")

// errOverflow is what a wait returns once its inbox held more than
// maxBuffered bytes that the caller had not read.
var errOverflow = errors.New("answer buffered beyond the limit")

// maxBuffered bounds, in bytes of message data, what one call's inbox holds
// unread: a stream that produces faster than its caller reads would
// otherwise grow the client without end. Past it the call is abandoned.
const maxBuffered = 64 << 20

// mux routes the answers of every call of a client through one wildcard
// subscription, <inbox>.*, as nats.go does for its own requests: a call's
// answer is many messages (heartbeats, chunks), which nc.Request cannot
// read, and a subscription per call would cost a SUB and an UNSUB each.
// The subscription is made at the first call; nats.go's delivery goroutine
// for it ends when shut (or the connection's Close) unsubscribes it.
type mux struct {
	nc *nats.Conn

	mu     sync.Mutex
	prefix string // "<inbox>."
	sub    *nats.Subscription
	gone   <-chan nats.SubStatus // closed once sub is closed
	closed bool
	next   uint64
	boxes  map[string]*inbox
}

// inbox queues one call's messages, up to maxBuffered bytes, so that the
// delivery goroutine, shared by all calls, never waits for a slow reader.
type inbox struct {
	subject string
	token   string
	gone    <-chan nats.SubStatus

	mu       sync.Mutex
	msgs     []*nats.Msg
	buffered int           // bytes of data in msgs
	overflow bool          // buffered passed maxBuffered: msgs dropped, the call abandoned
	ready    chan struct{} // holds one signal while msgs may be non-empty
}

func (m *mux) open() (*inbox, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, errClosed
	}
	if m.sub == nil || !m.sub.IsValid() {
		m.prefix = m.nc.NewInbox() + "."
		sub, err := m.nc.Subscribe(m.prefix+"*", m.deliver)
		if err != nil {
			return nil, err
		}
		// Streams and heartbeats of thousands of calls must not be dropped
		// as a slow consumer: the inboxes buffer them instead.
		if err := sub.SetPendingLimits(-1, -1); err != nil {
			_ = sub.Unsubscribe()
			return nil, err
		}
		m.sub, m.gone, m.boxes = sub, sub.StatusChanged(nats.SubscriptionClosed), map[string]*inbox{}
	}
	m.next++
	tok := strconv.FormatUint(m.next, 36)
	ib := &inbox{subject: m.prefix + tok, token: tok, gone: m.gone, ready: make(chan struct{}, 1)}
	m.boxes[tok] = ib
	return ib, nil
}

func (m *mux) close(ib *inbox) {
	m.mu.Lock()
	delete(m.boxes, ib.token)
	m.mu.Unlock()
}

func (m *mux) shut() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closed = true
	if m.sub != nil {
		_ = m.sub.Unsubscribe()
	}
}

func (m *mux) deliver(msg *nats.Msg) {
	m.mu.Lock()
	ib := m.boxes[msg.Subject[min(len(m.prefix), len(msg.Subject)):]]
	m.mu.Unlock()
	if ib == nil {
		return // a late message of a call that has ended
	}
	ib.mu.Lock()
	switch {
	case ib.overflow:
	case ib.buffered+len(msg.Data) > maxBuffered:
		ib.overflow, ib.msgs, ib.buffered = true, nil, 0
	default:
		ib.msgs = append(ib.msgs, msg)
		ib.buffered += len(msg.Data)
	}
	ib.mu.Unlock()
	select {
	case ib.ready <- struct{}{}:
	default:
	}
}

// wait returns the next message, or errSilent once lost (when not zero)
// has passed, ctx's error, errClosed, or errOverflow.
func (ib *inbox) wait(ctx context.Context, lost *time.Timer) (*nats.Msg, error) {
	var expired <-chan time.Time
	if lost != nil {
		expired = lost.C
	}
	for {
		ib.mu.Lock()
		if ib.overflow {
			ib.mu.Unlock()
			return nil, errOverflow
		}
		if len(ib.msgs) > 0 {
			msg := ib.msgs[0]
			ib.msgs[0] = nil
			ib.msgs = ib.msgs[1:]
			ib.buffered -= len(msg.Data)
			ib.mu.Unlock()
			return msg, nil
		}
		ib.mu.Unlock()
		select {
		case <-ib.ready:
		case <-expired:
			return nil, errSilent
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-ib.gone:
			return nil, errClosed
		}
	}
}
