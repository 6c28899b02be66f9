package client

import (
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pyfleet/pyfleet/protocol"
)

// Defaults of Options.
const (
	DefaultPool      = "default"
	DefaultTimeout   = 60 * time.Second
	DefaultHeartbeat = time.Second
	// DefaultNodesWait is how long Nodes collects answers when its context
	// has no deadline.
	DefaultNodesWait = 500 * time.Millisecond
)

// heartbeatsLost is how many heartbeat intervals of silence mean that the
// node holding a call is gone: one lost heartbeat is a hiccup, three a
// dead node.
const heartbeatsLost = 3

// Options configure a Client. The zero value calls pool "default" under the
// prefix "pyfleet", with heartbeats every second and a 60 s deadline for a
// call whose context has none.
type Options struct {
	// Pool whose functions the client calls.
	Pool string
	// Prefix of every subject, as the nodes' --prefix.
	Prefix string
	// Timeout is the deadline of a call when neither its context nor
	// WithTimeout gives one. A job's is WithTimeout's, else the node's
	// --job-timeout: a job outlives the context that submitted it.
	Timeout time.Duration
	// Heartbeat is how often a node holding a call says it is alive; after
	// three intervals of silence the call fails with ErrWorkerLost (or
	// ErrUnavailable if no node ever took it), long before its deadline.
	// Zero means DefaultHeartbeat; negative, none: a call then waits for
	// its deadline whatever happens to its node. The node accepts 100 ms
	// to an hour.
	Heartbeat time.Duration
	// NATS are options for Connect's connection (authentication, TLS,
	// handlers), after the client's own; New ignores them.
	NATS []nats.Option
}

// Client calls the functions of one pool, submits its jobs and follows the
// fleet, over one NATS connection. It is safe for concurrent use; Close it
// when done.
type Client struct {
	nc       *nats.Conn
	ownsConn bool
	js       jetstream.JetStream
	subjects protocol.Subjects
	pool     string
	timeout  time.Duration
	beat     time.Duration // 0: no heartbeats
	mux      *mux

	mu      sync.Mutex
	streams map[string]string  // stream names by subject wanted, once found
	status  jetstream.KeyValue // the jobs' status bucket, once found
}

// New returns a client on a connection the caller owns: Close leaves it
// open.
func New(nc *nats.Conn, o Options) (*Client, error) {
	if nc == nil {
		return nil, errors.New("client.New: nil *nats.Conn")
	}
	c := &Client{nc: nc, pool: o.Pool, timeout: o.Timeout, subjects: protocol.Subjects{Prefix: o.Prefix}}
	if c.pool == "" {
		c.pool = DefaultPool
	}
	if err := protocol.ValidToken(c.pool); err != nil {
		return nil, fmt.Errorf("client: pool: %w", err)
	}
	if err := protocol.ValidPrefix(c.subjects.Root()); err != nil {
		return nil, fmt.Errorf("client: prefix: %w", err)
	}
	switch {
	case o.Timeout < 0:
		return nil, fmt.Errorf("client: negative Timeout %v", o.Timeout)
	case o.Timeout == 0:
		c.timeout = DefaultTimeout
	}
	switch {
	case o.Heartbeat == 0:
		c.beat = DefaultHeartbeat
	case o.Heartbeat > 0 && (o.Heartbeat < 100*time.Millisecond || o.Heartbeat > time.Hour):
		return nil, fmt.Errorf("client: Heartbeat %v is outside 100ms..1h, what a node accepts", o.Heartbeat)
	case o.Heartbeat > 0:
		c.beat = o.Heartbeat
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("client: %w", err)
	}
	c.js = js
	c.mux = &mux{nc: nc}
	return c, nil
}

// Connect dials the NATS servers in urls (comma-separated) and returns a
// client that owns the connection: Close closes it. A failure names the
// servers with their passwords and tokens hidden.
func Connect(urls string, o Options) (*Client, error) {
	opts := append([]nats.Option{nats.Name("pyfleet client"), nats.Timeout(5 * time.Second)}, o.NATS...)
	nc, err := nats.Connect(urls, opts...)
	if err != nil {
		return nil, fmt.Errorf("cannot connect to NATS at %s: %w", RedactURLs(urls), err)
	}
	c, err := New(nc, o)
	if err != nil {
		nc.Close()
		return nil, err
	}
	c.ownsConn = true
	return c, nil
}

// Conn is the client's NATS connection.
func (c *Client) Conn() *nats.Conn { return c.nc }

// Pool is the pool the client calls.
func (c *Client) Pool() string { return c.pool }

// Subjects builds the subjects under the client's prefix, for messages
// that name them.
func (c *Client) Subjects() protocol.Subjects { return c.subjects }

// Close ends the client's subscription, and its connection if Connect made
// it. Calls still waiting fail.
func (c *Client) Close() {
	c.mux.shut()
	if c.ownsConn {
		c.nc.Close()
	}
}

// RedactURLs hides the passwords and tokens of a comma-separated list of
// server URLs, for messages.
func RedactURLs(list string) string {
	parts := strings.Split(list, ",")
	for i, p := range parts {
		p = strings.TrimSpace(p)
		u, err := url.Parse(p)
		if err != nil || u.User == nil {
			parts[i] = p
			continue
		}
		if _, hasPass := u.User.Password(); !hasPass {
			u.User = url.User("xxxxx") // a bare user part is a token
		}
		parts[i] = u.Redacted()
	}
	return strings.Join(parts, ",")
}
