package ratelimit

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/protocol"
)

// Config configures New.
type Config struct {
	Prefix   string // "" means protocol.DefaultPrefix
	Pool     string
	Replicas int // of the bucket when this node creates it; 0 means 1
}

// Limiter wraps a call.Handler so that each rate-limited function's calls
// and jobs start no faster than its limit, pool-wide.
type Limiter struct {
	kv        jetstream.KeyValue // nil: limits are per node
	pool      string
	intervals map[string]time.Duration // by function; absent: no limit
	log       *zap.Logger
	waiting   atomic.Int64

	mu    sync.Mutex
	local map[string]time.Time // the in-memory next slot, by function
}

// New reads the limits of fns and, when any function has one, opens (or
// creates) the bucket; nc nil, or a server without JetStream, keeps the
// limits per node. A limit that does not parse is an error naming its
// function: the node must not serve a function faster than its app said.
func New(ctx context.Context, nc *nats.Conn, cfg Config, fns []call.Function, log *zap.Logger) (*Limiter, error) {
	if log == nil {
		log = zap.NewNop()
	}
	l := &Limiter{pool: cfg.Pool, intervals: map[string]time.Duration{}, log: log.Named("ratelimit"), local: map[string]time.Time{}}
	for _, f := range fns {
		if f.RateLimit == "" {
			continue
		}
		iv, err := protocol.ParseRate(f.RateLimit)
		if err != nil {
			return nil, fmt.Errorf("function %s: %w", f.Name, err)
		}
		l.intervals[f.Name] = iv
		l.log.Info("rate limit", zap.String("function", f.Name), zap.String("limit", f.RateLimit), zap.Duration("interval", iv))
	}
	if len(l.intervals) == 0 || nc == nil {
		return l, nil
	}
	kv, err := openBucket(ctx, nc, cfg)
	if err != nil {
		l.log.Warn("rate limits hold per node, not per pool", zap.Error(err))
		return l, nil
	}
	l.kv = kv
	return l, nil
}

func openBucket(ctx context.Context, nc *nats.Conn, cfg Config) (jetstream.KeyValue, error) {
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, err
	}
	name := protocol.RateBucket(cfg.Prefix)
	kv, err := js.KeyValue(ctx, name)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		kv, err = js.CreateKeyValue(ctx, jetstream.KeyValueConfig{
			Bucket:      name,
			Description: "pyfleet rate limits: the next start of each limited function, by pool",
			Storage:     jetstream.MemoryStorage,
			Replicas:    max(cfg.Replicas, 1),
			History:     1,
		})
		if errors.Is(err, jetstream.ErrBucketExists) || errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			kv, err = js.KeyValue(ctx, name) // another node created it meanwhile
		}
	}
	if err != nil {
		return nil, fmt.Errorf("rate bucket %s: %w", name, err)
	}
	return kv, nil
}

// Limited reports whether any function has a limit.
func (l *Limiter) Limited() bool { return len(l.intervals) > 0 }

// Waiting is how many invocations wait for their slot on this node now. A
// node counts them as busy when it decides how many jobs to fetch, or it
// would fetch every waiting job of a limited function while its workers
// sit idle.
func (l *Limiter) Waiting() int { return int(l.waiting.Load()) }

// Wrap returns h with the limits applied before each call reaches it.
func (l *Limiter) Wrap(h call.Handler) call.Handler {
	if !l.Limited() {
		return h
	}
	return limited{h: h, l: l}
}

type limited struct {
	h call.Handler
	l *Limiter
}

func (w limited) Functions() []call.Function { return w.h.Functions() }

// StartCall starts a call of a function without a limit through h, when
// h can (pool.StartCall): a pool where some functions are limited keeps
// the path without a goroutine for the others. A limited function's call
// waits for its slot, so it is never started this way.
func (w limited) StartCall(req *call.Request, done func(call.Result, error)) (call.Running, bool) {
	s, ok := w.h.(call.Starter)
	if _, isLimited := w.l.intervals[req.Function]; isLimited || !ok {
		return nil, false
	}
	return s.StartCall(req, done)
}

func (w limited) Call(ctx context.Context, req *call.Request, emit call.Emit) (call.Result, error) {
	if iv, ok := w.l.intervals[req.Function]; ok {
		if err := w.l.wait(ctx, req.Function, iv); err != nil {
			return call.Result{}, err
		}
	}
	return w.h.Call(ctx, req, emit)
}

// wait reserves the function's next slot and sleeps until it.
func (l *Limiter) wait(ctx context.Context, function string, iv time.Duration) error {
	l.waiting.Add(1)
	defer l.waiting.Add(-1)
	deadline, _ := ctx.Deadline()
	slot, err := l.reserve(ctx, function, iv, deadline)
	if err != nil {
		return err
	}
	d := time.Until(slot)
	if d <= 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return call.Errorf(call.CodeDeadline, call.TypeDeadline, "the deadline passed while the call waited for its rate limit")
	}
}

// maxConflicts bounds the compare-and-set retries of one reservation; each
// conflict means another node took a slot, so this many are a pool far
// busier than any limit a key-value store can keep.
const maxConflicts = 100

// reserve takes the next slot of function: from the bucket, or from memory
// when there is no bucket or it fails.
func (l *Limiter) reserve(ctx context.Context, function string, iv time.Duration, deadline time.Time) (time.Time, error) {
	if l.kv != nil {
		slot, err := l.reserveKV(ctx, function, iv, deadline)
		var ce *call.Error
		if err == nil || errors.As(err, &ce) {
			return slot, err
		}
		l.log.Warn("rate bucket failed; limiting this call on this node only", zap.String("function", function), zap.Error(err))
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	slot := later(l.local[function], time.Now())
	if err := l.checkDeadline(function, slot, deadline); err != nil {
		return time.Time{}, err
	}
	l.local[function] = slot.Add(iv)
	return slot, nil
}

func (l *Limiter) reserveKV(ctx context.Context, function string, iv time.Duration, deadline time.Time) (time.Time, error) {
	key := protocol.StatusKey(l.pool, function)
	for range maxConflicts {
		var next time.Time
		var rev uint64
		e, err := l.kv.Get(ctx, key)
		switch {
		case errors.Is(err, jetstream.ErrKeyNotFound):
		case err != nil:
			return time.Time{}, err
		default:
			rev = e.Revision()
			if v := e.Value(); len(v) == 8 {
				next = time.Unix(0, int64(binary.BigEndian.Uint64(v)))
			}
		}
		slot := later(next, time.Now())
		if err := l.checkDeadline(function, slot, deadline); err != nil {
			return time.Time{}, err
		}
		val := binary.BigEndian.AppendUint64(nil, uint64(slot.Add(iv).UnixNano()))
		if rev == 0 {
			_, err = l.kv.Create(ctx, key, val)
		} else {
			_, err = l.kv.Update(ctx, key, val, rev)
		}
		if err == nil {
			return slot, nil
		}
		if !conflict(err) {
			return time.Time{}, err
		}
	}
	return time.Time{}, fmt.Errorf("%d conflicting updates of key %s in a row", maxConflicts, key)
}

// conflict reports whether err is a compare-and-set that lost to another
// node's.
func conflict(err error) bool {
	var apiErr *jetstream.APIError
	return errors.Is(err, jetstream.ErrKeyExists) ||
		(errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence)
}

// checkDeadline refuses a slot after the call's deadline now, rather than
// letting the call wait for nothing; 503 lets a job be delivered again
// later.
func (l *Limiter) checkDeadline(function string, slot, deadline time.Time) error {
	if deadline.IsZero() || !slot.After(deadline) {
		return nil
	}
	return call.Errorf(call.CodeUnavailable, call.TypeOverloaded,
		"function %s is at its rate limit: its next free start is in %v, after the call's deadline", function, time.Until(slot).Round(time.Millisecond))
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}
