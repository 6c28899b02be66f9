package client

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"iter"
	"sync"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/protocol"
)

// Session sends every call to the same worker: the first reaches any node
// of the pool, the following ones the node that answered it, with the same
// Pyfleet-Session key (docs/protocol.md, "Sessions"). Once that worker is
// gone, calls fail with ErrSessionLost; start a new session then. It is
// safe for concurrent use: calls made while the first is running wait for
// it, so that they all land on one worker.
type Session struct {
	c   *Client
	key string

	first sync.Mutex // held by the call that places the session
	mu    sync.Mutex
	node  string
}

// Session starts a session under key; an empty key picks a random one.
// Nothing is sent until its first call.
func (c *Client) Session(key string) *Session {
	if key == "" {
		key = randomID()
	}
	return &Session{c: c, key: key}
}

// Key is the session's Pyfleet-Session.
func (s *Session) Key() string { return s.key }

// Node is the node that holds the session, once a call reached a worker.
func (s *Session) Node() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.node
}

// Call is Client.Call in the session.
func (s *Session) Call(ctx context.Context, function string, arg, result any, opts ...Option) error {
	var err error
	s.route(func(o Option) { err = s.c.Call(ctx, function, arg, result, append(opts, o)...) })
	return err
}

// Stream is Client.Stream in the session.
func (s *Session) Stream(ctx context.Context, function string, arg any, opts ...Option) iter.Seq2[*Msg, error] {
	return func(yield func(*Msg, error) bool) {
		s.route(func(o Option) { s.c.Stream(ctx, function, arg, append(opts, o)...)(yield) })
	}
}

// route runs a call with the option that puts it in the session. Until a
// worker has answered, one call at a time goes out and the others wait:
// each would otherwise place the session on a node of its own. The first
// message from a worker is enough to know where the session lives, so a
// stream does not hold the others back for its whole length.
func (s *Session) route(run func(Option)) {
	node := s.Node()
	var release func()
	if node == "" {
		s.first.Lock()
		var once sync.Once
		release = func() { once.Do(s.first.Unlock) }
		defer release()
		node = s.Node()
	}
	run(func(o *options) {
		o.session = s.key
		if node != "" {
			o.node = node
			return
		}
		o.first = func(h nats.Header) {
			s.mu.Lock()
			if s.node == "" {
				s.node = protocol.Header(h, protocol.HeaderNode)
			}
			s.mu.Unlock()
			release()
		}
	})
}

func randomID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
