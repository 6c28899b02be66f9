package bus

import (
	"encoding/json"
	"time"

	"github.com/nats-io/nats.go"
	"go.uber.org/zap"

	"github.com/pyfleet/pyfleet/lifecycle"
	"github.com/pyfleet/pyfleet/protocol"
)

// EventPublisher publishes lifecycle events on
// <prefix>.evt.<pool>.<node>.<kind>, where PYFLEET_EVENTS keeps them.
type EventPublisher struct {
	nc         *nats.Conn
	subj       protocol.Subjects
	pool, node string
	log        *zap.Logger
}

// NewEventPublisher returns a publisher for one node; prefix "" means
// DefaultPrefix. Its Publish method is a lifecycle.Events.
func NewEventPublisher(nc *nats.Conn, prefix, pool, node string, log *zap.Logger) *EventPublisher {
	if log == nil {
		log = zap.NewNop()
	}
	return &EventPublisher{nc: nc, subj: protocol.Subjects{Prefix: prefix}, pool: pool, node: node, log: log.Named("events")}
}

var _ lifecycle.Events = (*EventPublisher)(nil).Publish

// Publish sends ev, filling in its time (UTC), pool and node when empty. It
// does not wait for the server: core NATS publishing only buffers, and while
// disconnected the buffer holds events until reconnection or until it is
// full. A failure is logged, not returned: the supervisor that reports an
// event has nothing better to do with it.
func (p *EventPublisher) Publish(ev lifecycle.Event) {
	if ev.TS.IsZero() {
		ev.TS = time.Now()
	}
	ev.TS = ev.TS.UTC()
	if ev.Pool == "" {
		ev.Pool = p.pool
	}
	if ev.Node == "" {
		ev.Node = p.node
	}
	log := p.log.With(zap.String("kind", ev.Kind), zap.String("pool", ev.Pool), zap.String("node", ev.Node))
	for _, tok := range []string{ev.Pool, ev.Node, ev.Kind} {
		if err := protocol.ValidToken(tok); err != nil {
			log.Error("lifecycle event not published", zap.Error(err))
			return
		}
	}
	data, err := json.Marshal(ev)
	if err != nil {
		log.Error("lifecycle event not published", zap.Error(err))
		return
	}
	if err := p.nc.Publish(p.subj.Event(ev.Pool, ev.Node, ev.Kind), data); err != nil {
		log.Warn("lifecycle event not published", zap.Error(err))
	}
}
