package bus

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
	"go.uber.org/zap"

	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/protocol"
)

// DefaultTimeout is the deadline of a request that names none.
const DefaultTimeout = 60 * time.Second

// DefaultMaxTimeout is the largest Pyfleet-Timeout a node takes by default.
const DefaultMaxTimeout = time.Hour

// ServiceConfig configures Serve.
type ServiceConfig struct {
	Prefix string // subject prefix; empty means DefaultPrefix
	Pool   string
	Node   string
	// Version is the micro service version (SemVer); empty means "0.0.0".
	Version string
	// Containment, if set, is the containment mode the node's workers run
	// in (lifecycle.ModeCgroup, ModePIDNS, ModeGroup): the service's
	// "containment" metadata, which `nats micro info` and `submit nodes`
	// show.
	Containment string
	// DefaultTimeout applies when a request has no Pyfleet-Timeout;
	// 0 means DefaultTimeout.
	DefaultTimeout time.Duration
	// MaxTimeout caps Pyfleet-Timeout (400 above it); 0 means DefaultMaxTimeout.
	MaxTimeout time.Duration
	// MaxPayload limits request bodies; 0 means the connection's limit.
	MaxPayload int
	// Stats, when set, adds node-wide figures (workers, busy, queued) to
	// every endpoint of `nats micro stats`. It is called from micro's
	// stats handler and must be quick.
	Stats func() any
	// Observe, when set, is told of every answered request: the function
	// named by the subject, the code (200 for ok) and the time from arrival
	// to answer. It is on the request path and must be quick.
	Observe func(function string, code int, d time.Duration)
}

// Service serves a call.Handler on NATS until Stop.
type Service struct {
	nc      *nats.Conn
	h       call.Handler
	starter call.Starter // h, if it is one
	log     *zap.Logger
	svc     micro.Service
	funcs   map[string]*call.Function // pointers: the wildcard endpoint hands one per request without a copy escaping
	node    string
	limits  admitLimits
	stats   func() any
	observe func(function string, code int, d time.Duration)

	mu       sync.Mutex
	state    serviceState
	inFlight int
	idle     chan struct{} // closed once stopped with nothing in flight
	// running holds every call in flight by its reply subject, which only
	// its caller knows: a cancel message names it
	// (protocol.Subjects.CancelCall). It is also how Stop cuts short the
	// calls its ctx gave no more time to: a call's context has no parent
	// to cancel, since registering each call with a shared parent took a
	// lock that every call on every core contended for.
	running   map[string]*inflight
	cancelSub *nats.Subscription

	endpoints map[string]*endpointCounters // by endpoint subject; fixed by Serve
}

type serviceState int

const (
	serving serviceState = iota
	draining
	stopped
)

// endpointCounters are kept beside micro's own: micro counts an error only
// when the handler answers before it returns, and ours answer later, from
// their own goroutine.
type endpointCounters struct {
	inFlight  atomic.Int64
	completed atomic.Int64
	errors    atomic.Int64
	lastError atomic.Pointer[string]
}

// failed counts an error reply. The last error is kept as its one-line,
// capped description: a function may raise with a message of megabytes,
// and `nats micro stats` must still fit in a message.
func (c *endpointCounters) failed(e *call.Error) {
	c.errors.Add(1)
	d := errorDescription(e)
	c.lastError.Store(&d)
}

// EndpointData is the "data" of each endpoint in `nats micro stats`.
type EndpointData struct {
	InFlight  int64  `json:"in_flight"`
	Completed int64  `json:"completed"`
	Errors    int64  `json:"errors"` // every error reply, unlike num_errors
	LastError string `json:"last_error,omitempty"`
	Node      any    `json:"node,omitempty"` // ServiceConfig.Stats
}

// Serve registers the micro service "pyfleet" for cfg.Pool on nc and serves
// h's functions on:
//
//	<prefix>.req.<pool>.<function>   one endpoint per function
//	<prefix>.req.<pool>.*            any function, and 404 for unknown ones
//	<prefix>.node.<node>.<pool>.*    this node only (sessions)
//
// The first two share one queue group per pool across all nodes. nats-server
// merges queue subscribers of the same group over every subject that
// matches, then picks one, so a request to a known function may land on the
// wildcard endpoint: that endpoint therefore serves every function, and the
// per-function endpoints exist so that `nats micro info` lists them.
func Serve(nc *nats.Conn, cfg ServiceConfig, h call.Handler, log *zap.Logger) (*Service, error) {
	if log == nil {
		log = zap.NewNop()
	}
	if err := cfg.valid(); err != nil {
		return nil, err
	}
	starter, _ := h.(call.Starter)
	s := &Service{
		nc:        nc,
		h:         h,
		starter:   starter,
		log:       log.Named("service"),
		funcs:     map[string]*call.Function{},
		node:      cfg.Node,
		stats:     cfg.Stats,
		observe:   cfg.Observe,
		idle:      make(chan struct{}),
		endpoints: map[string]*endpointCounters{},
		running:   map[string]*inflight{},
	}
	var err error
	if s.limits, err = cfg.limits(int(nc.MaxPayload())); err != nil {
		return nil, fmt.Errorf("serve pool %q: %w", cfg.Pool, err)
	}
	fns := h.Functions()
	for _, f := range fns {
		if err := protocol.ValidToken(f.Name); err != nil {
			return nil, fmt.Errorf("serve pool %q: function name: %w", cfg.Pool, err)
		}
		if _, dup := s.funcs[f.Name]; dup {
			return nil, fmt.Errorf("serve pool %q: function %q is listed twice", cfg.Pool, f.Name)
		}
		s.funcs[f.Name] = &f
	}
	eps := cfg.endpoints(fns)
	for _, ep := range eps {
		s.endpoints[ep.subject] = &endpointCounters{}
	}
	if err := s.register(cfg, eps); err != nil {
		return nil, fmt.Errorf("serve pool %q: %w", cfg.Pool, err)
	}
	// Every node of the pool hears every cancel: the caller does not know
	// which node took its call. nats.go's own goroutine runs the handler;
	// Stop unsubscribes.
	if s.cancelSub, err = nc.Subscribe(protocol.Subjects{Prefix: cfg.Prefix}.CancelCall(cfg.Pool), s.cancelCall); err != nil {
		_ = s.svc.Stop()
		return nil, fmt.Errorf("serve pool %q: cancel subscription: %w", cfg.Pool, err)
	}
	// Once Serve returns, the subscriptions are in place on the server, so
	// a caller that learns of this node (from node_started, say) can reach it.
	if err := nc.FlushTimeout(5 * time.Second); err != nil {
		s.log.Warn("subscriptions not confirmed by the server; they are sent again on reconnection", zap.Error(err))
	}
	// The logger names the node and the pool already.
	s.log.Info("serving", zap.Int("functions", len(fns)), zap.String("subject", protocol.Subjects{Prefix: cfg.Prefix}.Request(cfg.Pool, "*")))
	return s, nil
}

// limits are the limits of cfg with its defaults filled in; maxPayload is
// the connection's.
func (cfg ServiceConfig) limits(maxPayload int) (admitLimits, error) {
	l := admitLimits{defaultTimeout: cfg.DefaultTimeout, maxTimeout: cfg.MaxTimeout, maxBytes: cfg.MaxPayload}
	if l.maxTimeout <= 0 {
		l.maxTimeout = DefaultMaxTimeout
	}
	if l.defaultTimeout <= 0 {
		l.defaultTimeout = min(DefaultTimeout, l.maxTimeout)
	}
	if l.defaultTimeout > l.maxTimeout {
		return l, fmt.Errorf("default timeout %s is over the max timeout %s", l.defaultTimeout, l.maxTimeout)
	}
	if l.maxBytes <= 0 || (maxPayload > 0 && l.maxBytes > maxPayload) {
		l.maxBytes = maxPayload
	}
	return l, nil
}

// endpoint is one micro endpoint of the service.
type endpoint struct {
	name, subject string
	fn            *call.Function // nil: any function, looked up by name
	meta          map[string]string
	opt           micro.EndpointOpt
}

// endpoints lists the endpoints Serve documents: one per function, the
// pool's wildcard and this node's own.
func (cfg ServiceConfig) endpoints(fns []call.Function) []endpoint {
	sub := protocol.Subjects{Prefix: cfg.Prefix}
	eps := make([]endpoint, 0, len(fns)+2)
	for _, f := range fns {
		eps = append(eps, endpoint{
			name:    endpointName(f.Name),
			subject: sub.Request(cfg.Pool, f.Name),
			fn:      &f,
			meta:    functionMeta(f),
		})
	}
	return append(eps,
		endpoint{name: "_any", subject: sub.Request(cfg.Pool, "*"),
			meta: map[string]string{"function": "*"}},
		// Its own queue group keeps one node name from running a call
		// twice if two nodes are misconfigured with the same name.
		endpoint{name: "_node", subject: sub.Node(cfg.Node, cfg.Pool, "*"),
			meta: map[string]string{"function": "*", "node": cfg.Node},
			opt:  micro.WithEndpointQueueGroup(sub.Root() + ".node." + cfg.Node)},
	)
}

// functionMeta is a function endpoint's metadata (docs/protocol.md, "Micro
// service"), its schemas included when they are within
// protocol.MaxSchemaBytes.
func functionMeta(f call.Function) map[string]string {
	meta := map[string]string{
		protocol.MetaFunction: f.Name,
		protocol.MetaRaw:      strconv.FormatBool(f.Raw),
		protocol.MetaStream:   strconv.FormatBool(f.Stream),
	}
	if f.RateLimit != "" {
		meta[protocol.MetaRateLimit] = f.RateLimit
	}
	for key, s := range map[string][]byte{protocol.MetaInputSchema: f.InputSchema, protocol.MetaOutputSchema: f.OutputSchema} {
		if len(s) > 0 && len(s) <= protocol.MaxSchemaBytes {
			meta[key] = string(s)
		}
	}
	return meta
}

// register adds the micro service and its endpoints eps.
func (s *Service) register(cfg ServiceConfig, eps []endpoint) error {
	sub := protocol.Subjects{Prefix: cfg.Prefix}
	version := cfg.Version
	if version == "" {
		version = "0.0.0"
	}
	meta := map[string]string{protocol.MetaPool: cfg.Pool, protocol.MetaNode: cfg.Node, protocol.MetaPrefix: sub.Root()}
	if cfg.Containment != "" {
		meta[protocol.MetaContainment] = cfg.Containment
	}
	svc, err := micro.AddService(s.nc, micro.Config{
		Name:        protocol.ServiceName,
		Version:     version,
		Description: "pyfleet pool " + cfg.Pool,
		Metadata:    meta,
		QueueGroup:  queueGroup(sub, cfg.Pool),
		StatsHandler: func(ep *micro.Endpoint) any {
			return s.endpointData(ep.Subject)
		},
		ErrorHandler: func(_ micro.Service, err *micro.NATSError) {
			s.log.Error("NATS service error", zap.String("subject", err.Subject), zap.String("error", err.Description))
		},
	})
	if err != nil {
		return err
	}
	s.svc = svc
	for _, ep := range eps {
		opts := []micro.EndpointOpt{micro.WithEndpointSubject(ep.subject), micro.WithEndpointMetadata(ep.meta)}
		if ep.opt != nil {
			opts = append(opts, ep.opt)
		}
		counters, fn := s.endpoints[ep.subject], ep.fn
		handler := micro.HandlerFunc(func(r micro.Request) { s.handle(r, fn, counters) })
		if err := svc.AddEndpoint(ep.name, handler, opts...); err != nil {
			_ = svc.Stop()
			return fmt.Errorf("endpoint %s: %w", ep.subject, err)
		}
	}
	return nil
}

func (cfg ServiceConfig) valid() error {
	if cfg.Prefix != "" {
		if err := protocol.ValidPrefix(cfg.Prefix); err != nil {
			return fmt.Errorf("serve: %w", err)
		}
	}
	if err := protocol.ValidToken(cfg.Pool); err != nil {
		return fmt.Errorf("serve: pool name: %w", err)
	}
	if err := protocol.ValidToken(cfg.Node); err != nil {
		return fmt.Errorf("serve: node name: %w", err)
	}
	return nil
}

// queueGroup is shared by every node of a pool. It is named after the pool
// rather than micro's default "q" so that it can never merge with another
// service's subscribers on an overlapping subject.
func queueGroup(sub protocol.Subjects, pool string) string {
	return sub.Root() + "." + pool
}

// endpointName fits a function name to micro's endpoint names, which allow
// fewer characters than a subject token; the subject keeps the real name.
func endpointName(function string) string {
	return safeName(function)
}

func (s *Service) endpointData(subject string) EndpointData {
	var d EndpointData
	if c := s.endpoints[subject]; c != nil {
		d.InFlight, d.Completed, d.Errors = c.inFlight.Load(), c.completed.Load(), c.errors.Load()
		if e := c.lastError.Load(); e != nil {
			d.LastError = *e
		}
	}
	if s.stats != nil {
		d.Node = s.stats()
	}
	return d
}

// Drain makes every request from now on answer 503 Draining at once, so
// that callers retry elsewhere, while calls already accepted run to the end.
func (s *Service) Drain() {
	s.mu.Lock()
	if s.state == serving {
		s.state = draining
	}
	s.mu.Unlock()
}

// Stop stops the micro service and waits until every accepted call has
// answered or ctx ends. If ctx ends first, the calls still running have
// their contexts cancelled (a handler that honours ctx then returns, and its
// caller gets 503) and Stop returns an error saying how many were left. Stop
// may be called more than once.
func (s *Service) Stop(ctx context.Context) error {
	s.mu.Lock()
	first := s.state != stopped
	s.state = stopped
	if first && s.inFlight == 0 {
		close(s.idle)
	}
	s.mu.Unlock()
	var err error
	if first {
		// Drains the subscriptions: messages already delivered to us
		// still reach handle, which answers them 503.
		if err = s.svc.Stop(); err != nil {
			err = fmt.Errorf("stop service: %w", err)
		}
		// Cancels still count while the calls in flight finish.
		defer func() { _ = s.cancelSub.Unsubscribe() }()
	}
	select {
	case <-s.idle:
		return err
	case <-ctx.Done():
		// Counted before the abort: the calls it cuts short end at once.
		n := s.abortCalls()
		return errors.Join(err, fmt.Errorf("stop service: %d calls still running, cancelled: %w", n, ctx.Err()))
	}
}

// abortCalls cancels every call in flight and says how many there were.
// The service is stopped, so no call can start after.
func (s *Service) abortCalls() int {
	s.mu.Lock()
	n := s.inFlight
	var calls []*inflight
	for _, f := range s.running {
		for ; f != nil; f = f.next {
			calls = append(calls, f)
		}
	}
	s.mu.Unlock()
	for _, f := range calls {
		f.stop(nil) // context.Canceled: a handler that returns ctx.Err() answers 503
	}
	return n
}

// stop cancels the call with cause.
func (f *inflight) stop(cause error) {
	f.cancel(cause)
	if r, _ := f.run.Load().(call.Running); r != nil {
		r.Cancel()
	}
}

// inflight is one call in flight, listed by its reply subject.
type inflight struct {
	cancel context.CancelCauseFunc
	// run is the call.Running of a call started through call.Starter,
	// which a cancel must reach too: no context of the call's is watched.
	run atomic.Value
	// next is a call with the same reply subject that came later (a
	// caller reusing one for two calls at once). A cancel message reaches
	// the first only: the two cannot be told apart.
	next *inflight
}

// begin admits one call unless the service is draining or stopped, and
// lists f (nil for a call refused anyway) under reply until end.
func (s *Service) begin(reply string, f *inflight) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state != serving {
		return false
	}
	s.inFlight++
	if f != nil {
		if first := s.running[reply]; first != nil {
			for first.next != nil {
				first = first.next
			}
			first.next = f
		} else {
			s.running[reply] = f
		}
	}
	return true
}

// end is the end of a call begin admitted; f is what it listed.
func (s *Service) end(reply string, f *inflight) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if f != nil {
		s.unlist(reply, f)
	}
	s.inFlight--
	if s.state == stopped && s.inFlight == 0 {
		close(s.idle)
	}
}

// unlist takes f off the calls listed under reply. Called with mu held.
func (s *Service) unlist(reply string, f *inflight) {
	first := s.running[reply]
	if first == f {
		if f.next != nil {
			s.running[reply] = f.next
		} else {
			delete(s.running, reply)
		}
		return
	}
	for p := first; p != nil; p = p.next {
		if p.next == f {
			p.next = f.next
			return
		}
	}
}

// handle runs on micro's subscription goroutine, one message at a time, so
// it only checks the request and hands it to a goroutine of its own.
// Everything it can refuse at once it refuses through micro's Request.Error,
// which micro's stats count.
func (s *Service) handle(r micro.Request, fn *call.Function, c *endpointCounters) {
	arrived := time.Now()
	reply := r.Reply()
	if reply == "" {
		s.log.Warn("request without a reply subject ignored: publish it with a reply subject (a request)",
			zap.String("subject", r.Subject()))
		return
	}
	name := lastToken(r.Subject())
	if fn == nil {
		fn = s.funcs[name]
	}
	// The headers are checked before any value of theirs is used, even to
	// echo the request id in a refusal.
	a, refusal := admit(s.limits, nats.Header(r.Headers()), name, fn, r.Data())
	refuse := func(e *call.Error) {
		h, body := errorMsg(e, s.node, a.requestID)
		s.observed(name, e.Code, arrived)
		c.failed(e)
		if err := r.Error(strconv.Itoa(e.Code), errorDescription(e), body, micro.WithHeaders(micro.Headers(h))); err != nil {
			s.log.Warn("cannot answer request", zap.String("subject", r.Subject()), zap.Error(err))
		}
	}
	// The call's cancel is listed as it is admitted, under the same lock,
	// so that a Stop that cuts calls short finds every call it admitted.
	var f *inflight
	var ctx *callCtx
	if refusal == nil {
		f = &inflight{}
		ctx = &callCtx{}
		ctx.Context, f.cancel = context.WithCancelCause(context.Background())
	}
	// Draining comes first: another node may take what this one would
	// refuse (it may have the function this one lacks).
	if !s.begin(reply, f) {
		if f != nil {
			f.cancel(nil)
		}
		refuse(call.Errorf(call.CodeUnavailable, call.TypeDraining, "node %s is draining: retry on another node", s.node))
		return
	}
	if refusal != nil {
		refuse(refusal)
		s.end(reply, nil)
		return
	}
	a.req.Deadline = time.Now().Add(a.timeout)
	ctx.deadline = a.req.Deadline
	c.inFlight.Add(1)
	// The first heartbeat goes at once, whichever way the call runs.
	var beats *heartbeat
	if a.heartbeat > 0 {
		beats = s.heartbeats(reply, a.req.RequestID, a.heartbeat)
	}
	// A plain call (no progress, no stream: nearly every call) allocates
	// none of what the others need; see BenchmarkServiceRequest.
	var st *streamState
	if a.progress || fn.Stream {
		st = &streamState{}
	}
	if a.progress {
		a.req.Progress = s.progress(reply, a.req.RequestID, st)
	}
	// A call of a function that does not stream (heartbeats, which the
	// clients ask for by default, are a timer; progress goes from the
	// handler's goroutine) is started from here, if a worker is free, and
	// answered from the goroutine that hears its end: no goroutine of its
	// own. The handler decides which of a session's calls it can start
	// (pool.StartCall).
	if s.starter != nil && !fn.Stream && s.start(ctx, f, reply, fn, a, beats, st, c, arrived) {
		return
	}
	go func() {
		defer s.end(reply, f)
		defer c.inFlight.Add(-1)
		s.answer(ctx, f.cancel, reply, fn, a, beats, st, c, arrived)
	}()
}

// admitLimits are what admit holds a request to.
type admitLimits struct {
	defaultTimeout time.Duration
	maxTimeout     time.Duration
	maxBytes       int
}

// admission is what admit makes of a request.
type admission struct {
	// requestID is the request's Pyfleet-Request-Id once the headers are
	// known to be safe to echo, even if the request is refused later.
	requestID string
	// req, timeout and heartbeat are set when the request is admitted;
	// req.Deadline is left to the caller.
	req                *call.Request
	timeout, heartbeat time.Duration
	// progress: the caller asked for the call's progress (HeaderProgress).
	progress bool
}

// admit decides whether the node takes a request for fn (nil when the pool
// has no function called name) with these headers and body: everything a
// node can refuse without running the call. It touches neither NATS nor the
// clock, so that the fuzz tests in this package can call it. Anything it
// admits is safe to put in a worker's frame (see FuzzAdmit).
func admit(l admitLimits, hdr nats.Header, name string, fn *call.Function, data []byte) (admission, *call.Error) {
	var a admission
	if err := checkHeaders(hdr); err != nil {
		return a, err
	}
	a.requestID = protocol.Header(hdr, protocol.HeaderRequestID)
	if fn == nil {
		return a, call.Errorf(call.CodeNotFound, call.TypeNotFound, "no function %q in this pool", name)
	}
	if len(data) > l.maxBytes {
		return a, call.Errorf(call.CodeTooLarge, call.TypeTooLarge, "request body of %d bytes is over the limit of %d bytes", len(data), l.maxBytes)
	}
	timeout, err := checkTimeout(hdr, l.defaultTimeout, l.maxTimeout)
	if err != nil {
		return a, err
	}
	heartbeat, err := parseHeartbeat(hdr)
	if err != nil {
		return a, err
	}
	if !fn.Raw {
		if err := checkJSON(data); err != nil {
			return a, err
		}
	}
	a.timeout, a.heartbeat = timeout, heartbeat
	if v := protocol.Header(hdr, protocol.HeaderProgress); v != "" && v != "0" {
		a.progress = true
	}
	// Copies: a value may share memory with the whole header block, and a
	// session key outlives the request in the pool.
	a.req = &call.Request{
		Function:  fn.Name,
		Payload:   data,
		Session:   strings.Clone(protocol.Header(hdr, protocol.HeaderSession)),
		RequestID: strings.Clone(a.requestID),
	}
	return a, nil
}

func (s *Service) observed(function string, code int, arrived time.Time) {
	if s.observe != nil {
		s.observe(function, code, time.Since(arrived))
	}
}

// minHeartbeat bounds how often a client may ask for heartbeats.
const minHeartbeat = 100 * time.Millisecond

// parseHeartbeat reads Pyfleet-Heartbeat; 0 when absent.
func parseHeartbeat(h nats.Header) (time.Duration, *call.Error) {
	v := protocol.Header(h, protocol.HeaderHeartbeat)
	if v == "" {
		return 0, nil
	}
	ms, err := strconv.ParseInt(v, 10, 64)
	if err != nil || time.Duration(ms)*time.Millisecond < minHeartbeat || ms > 3600_000 {
		return 0, call.Errorf(call.CodeBadRequest, call.TypeBadRequest, "header %s: %q is not a whole number of milliseconds from %d to 3600000", protocol.HeaderHeartbeat, v, minHeartbeat.Milliseconds())
	}
	return time.Duration(ms) * time.Millisecond, nil
}

// heartbeats sends a heartbeat to reply now and every interval until its
// stop, which returns once no heartbeat can follow, so that the answer is
// always the last message the client gets.
func (s *Service) heartbeats(reply, requestID string, interval time.Duration) *heartbeat {
	h := &heartbeat{interval: interval, beat: func() {
		m := &nats.Msg{Subject: reply, Header: replyHeader(protocol.StatusOK, s.node, "", requestID)}
		m.Header[protocol.HeaderStream] = []string{protocol.StreamHeartbeat}
		_ = s.nc.PublishMsg(m)
	}}
	h.beat()
	h.mu.Lock()
	defer h.mu.Unlock()
	h.fires.Add(1)
	h.timer = time.AfterFunc(interval, h.fire)
	return h
}

// heartbeat is one call's heartbeats: a timer rather than a goroutine, so
// that a call that ends within its first interval, as nearly all do, costs
// a timer armed and stopped, and can still be started without a goroutine
// (call.Starter).
type heartbeat struct {
	interval time.Duration
	beat     func()
	// fires counts the timer's armed or running fire, which stop waits
	// for; it is added to only under mu while not stopped.
	fires   sync.WaitGroup
	mu      sync.Mutex
	stopped bool        // under mu
	timer   *time.Timer // under mu
}

func (h *heartbeat) fire() {
	defer h.fires.Done()
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.stopped {
		return
	}
	h.beat()
	h.fires.Add(1)
	h.timer.Reset(h.interval)
}

// stop ends the heartbeats and returns once none can follow. A nil h has
// none; stop may be called more than once.
func (h *heartbeat) stop() {
	if h == nil {
		return
	}
	h.mu.Lock()
	if !h.stopped {
		h.stopped = true
		if h.timer.Stop() {
			h.fires.Done() // the armed fire will not run
		}
	}
	h.mu.Unlock()
	h.fires.Wait()
}

// every calls f every interval, on a goroutine of its own, until the
// returned stop is called (a job's lease renewal; a call's heartbeats are
// a timer, see heartbeat). stop may be called more than once; it returns
// once f has returned for the last time.
func every(interval time.Duration, f func()) (stop func()) {
	done := make(chan struct{})
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				f()
			}
		}
	}()
	var once sync.Once
	return func() {
		once.Do(func() { close(done) })
		<-exited
	}
}

// checkTimeout reads Pyfleet-Timeout, or returns def when it is absent,
// held to max (--max-timeout): a caller may not hold a worker slot, a queue
// place and a session longer than the node allows. The default (--request-timeout) is held to max where it is set.
func checkTimeout(h nats.Header, def, max time.Duration) (time.Duration, *call.Error) {
	v := protocol.Header(h, protocol.HeaderTimeout)
	if v == "" {
		return def, nil
	}
	ms, err := strconv.ParseInt(v, 10, 64)
	if errors.Is(err, strconv.ErrRange) && ms > 0 {
		ms, err = math.MaxInt64, nil // over any limit, and said so below
	}
	if err != nil || ms <= 0 {
		return 0, call.Errorf(call.CodeBadRequest, call.TypeBadRequest, "header %s: %q is not a positive whole number of milliseconds", protocol.HeaderTimeout, v)
	}
	if ms > max.Milliseconds() {
		return 0, call.Errorf(call.CodeBadRequest, call.TypeBadRequest, "header %s: %q milliseconds is over this node's limit of %d (%s, --max-timeout)",
			protocol.HeaderTimeout, v, max.Milliseconds(), max)
	}
	return time.Duration(ms) * time.Millisecond, nil
}

// answer makes the call and publishes its answer. It publishes straight to
// the reply subject: micro's Request is not safe to use once its handler
// returned.
//
// ctx is the call's context, which a cancel message or Stop cancels
// (cancelCall), and answer at the call's deadline.
func (s *Service) answer(ctx *callCtx, cancelCall context.CancelCauseFunc, reply string, fn *call.Function, a admission, beats *heartbeat, st *streamState, c *endpointCounters, arrived time.Time) {
	req := a.req
	deadline := time.AfterFunc(time.Until(req.Deadline), func() { cancelCall(context.DeadlineExceeded) })
	defer func() {
		deadline.Stop()
		cancelCall(nil)
	}()
	emit := notStreaming
	if fn.Stream {
		emit = func(ch call.Chunk) error {
			if st.done.Load() {
				return errors.New("emit after the call returned")
			}
			m := &nats.Msg{Subject: reply, Data: ch.Data, Header: replyHeader(protocol.StatusOK, s.node, ch.Worker, req.RequestID)}
			m.Header[protocol.HeaderStream] = []string{protocol.StreamChunk}
			err := s.nc.PublishMsg(m)
			if errors.Is(err, nats.ErrMaxPayload) {
				// The end message must say why the stream stopped,
				// whatever the handler makes of this error.
				e := call.Errorf(call.CodeTooLarge, call.TypeTooLarge, "chunk of %d bytes is over the limit of %d bytes", len(ch.Data), s.nc.MaxPayload())
				e.Worker = ch.Worker
				st.emitErr.Store(e)
				return e
			}
			return err
		}
	}
	res, err := s.h.Call(ctx, req, emit)
	beats.stop() // no heartbeat may follow the answer
	if st != nil {
		st.done.Store(true)
		st.endProgress()
		if e := st.emitErr.Load(); e != nil {
			err = e
		}
	}
	s.reply(ctx, reply, fn, a, c, arrived, res, err)
}

// reply publishes the answer of a call that returned res, err.
func (s *Service) reply(ctx *callCtx, reply string, fn *call.Function, a admission, c *endpointCounters, arrived time.Time, res call.Result, err error) {
	req, timeout := a.req, a.timeout
	if errors.Is(context.Cause(ctx), errCallerCancelled) {
		// Nobody may be listening, but a caller that cancelled in one
		// place and still reads in another learns why.
		err = call.Errorf(call.CodeCancelled, call.TypeCancelled, "the caller cancelled the call")
	}

	var m *nats.Msg
	if err != nil {
		e := callError(ctx, err, timeout, s.node)
		s.observed(fn.Name, e.Code, arrived)
		c.failed(e)
		m = &nats.Msg{Subject: reply}
		m.Header, m.Data = errorMsg(e, s.node, req.RequestID)
		if e.Code == call.CodeFailed && e.Type == call.TypeInternal {
			s.log.Error("call failed", zap.String("function", fn.Name), zap.String("request_id", req.RequestID), zap.Error(err))
		}
	} else {
		s.observed(fn.Name, 200, arrived)
		m = &nats.Msg{Subject: reply, Header: replyHeader(protocol.StatusOK, s.node, res.Worker, req.RequestID)}
		if !fn.Stream {
			m.Data = res.Data
		}
	}
	if fn.Stream {
		m.Header[protocol.HeaderStream] = []string{protocol.StreamEnd}
	}
	c.completed.Add(1)
	if err := s.publish(m); err != nil {
		s.log.Warn("cannot send reply", zap.String("function", fn.Name), zap.String("request_id", req.RequestID), zap.Error(err))
	}
}

// start starts a call through the handler's call.Starter, and reports
// whether it did. Its answer then comes from the goroutine the handler
// calls done on.
func (s *Service) start(ctx *callCtx, f *inflight, reply string, fn *call.Function, a admission, beats *heartbeat, st *streamState, c *endpointCounters, arrived time.Time) bool {
	r, ok := s.starter.StartCall(a.req, func(res call.Result, err error) {
		beats.stop() // no heartbeat may follow the answer
		st.endProgress()
		s.reply(ctx, reply, fn, a, c, arrived, res, err)
		f.cancel(nil) // ctx holds nothing, but every context is ended
		c.inFlight.Add(-1)
		s.end(reply, f)
	})
	if !ok {
		return false
	}
	f.run.Store(r)
	// A cancel (or Stop) that came before the Store did not see r: it
	// cancelled ctx, which is checked after the Store.
	if ctx.Context.Err() != nil {
		r.Cancel()
	}
	return true
}

// callCtx is a call's context: one context with both its cancel cause
// (errCallerCancelled, context.Canceled when Stop cuts it short,
// context.DeadlineExceeded at its deadline) and its deadline, where
// context.WithDeadline over context.WithCancelCause took two, a map of
// children and a lock between them, for every call (test/bench/notes.md,
// "A leaner node path"). The deadline is a cancel whose cause is
// context.DeadlineExceeded; Err says so, as a deadline's context does.
// A context derived from it sees context.Canceled at the deadline, with
// context.DeadlineExceeded as its cause.
type callCtx struct {
	context.Context // from context.WithCancelCause: Done, Value, the cause
	deadline        time.Time
}

func (c *callCtx) Deadline() (time.Time, bool) { return c.deadline, true }

func (c *callCtx) Err() error {
	err := c.Context.Err()
	if err != nil && context.Cause(c.Context) == context.DeadlineExceeded {
		return context.DeadlineExceeded
	}
	return err
}

// streamState is what a call that sends more than its answer (progress,
// chunks) shares with the callbacks that send them.
type streamState struct {
	mu           sync.Mutex  // Progress may race the end of the call
	progressDone bool        // under mu: no progress may follow the answer
	done         atomic.Bool // an Emit after Call returned would land after the end message
	emitErr      atomic.Pointer[call.Error]
}

// progress sends each progress value of a call to its caller, until the
// call's answer (streamState.endProgress).
func (s *Service) progress(reply, requestID string, st *streamState) func([]byte) {
	return func(v []byte) {
		m := &nats.Msg{Subject: reply, Data: v, Header: replyHeader(protocol.StatusOK, s.node, "", requestID)}
		m.Header[protocol.HeaderStream] = []string{protocol.StreamProgress}
		st.mu.Lock()
		defer st.mu.Unlock()
		if !st.progressDone {
			_ = s.nc.PublishMsg(m)
		}
	}
}

// endProgress makes sure no progress follows the answer; a nil st has
// none.
func (st *streamState) endProgress() {
	if st == nil {
		return
	}
	st.mu.Lock()
	st.progressDone = true
	st.mu.Unlock()
}

// errNotStreaming is what emit returns for a function that does not
// stream: a worker that sends chunks for one is cancelled (the pool's
// execution.result).
var errNotStreaming = errors.New("the function does not stream")

// notStreaming is the emit of a function that does not stream; one shared
// func, so a plain call allocates no closure for it.
func notStreaming(call.Chunk) error { return errNotStreaming }

// errCallerCancelled is the cause of a call's context when its caller
// cancelled it.
var errCallerCancelled = errors.New("the caller cancelled the call")

// cancelCall handles a cancel message: its body is the reply subject of the
// call to stop. A call this node does not run is none of its business.
func (s *Service) cancelCall(m *nats.Msg) {
	s.mu.Lock()
	f := s.running[string(m.Data)]
	s.mu.Unlock()
	if f != nil {
		f.stop(errCallerCancelled)
	}
}

// callError maps what Call returned to what the caller sees. A handler that
// gives up because ctx ended may return ctx's error: the caller must still
// learn that the deadline passed (408) or that the node stopped (503).
func callError(ctx context.Context, err error, timeout time.Duration, node string) *call.Error {
	var ce *call.Error
	if errors.As(err, &ce) && ce != nil {
		return asCallError(ce)
	}
	switch {
	case errors.Is(err, context.DeadlineExceeded) || (errors.Is(err, context.Canceled) && errors.Is(ctx.Err(), context.DeadlineExceeded)):
		return call.Errorf(call.CodeDeadline, call.TypeDeadline, "deadline of %s passed", timeout)
	case errors.Is(err, context.Canceled) && ctx.Err() != nil:
		return call.Errorf(call.CodeUnavailable, call.TypeDraining, "node %s stopped before the call finished", node)
	}
	return asCallError(err)
}

// publish sends m; a reply over the server's limit is answered with a 413
// instead, so the caller is not left waiting for a reply that never comes.
// The 413 carries none of the oversized reply, and if even it cannot be sent
// (a server whose max_payload is smaller than a few headers), a bare 413
// without the request id is.
func (s *Service) publish(m *nats.Msg) error {
	err := s.nc.PublishMsg(m)
	if !errors.Is(err, nats.ErrMaxPayload) {
		return err
	}
	e := call.Errorf(call.CodeTooLarge, call.TypeTooLarge, "reply of %d bytes (headers included) is over the limit of %d bytes", msgSize(m), s.nc.MaxPayload())
	e.Worker = m.Header.Get(protocol.HeaderWorker)
	h, body := errorMsg(e, s.node, m.Header.Get(protocol.HeaderRequestID))
	stream := m.Header.Get(protocol.HeaderStream) != ""
	if stream {
		h[protocol.HeaderStream] = []string{protocol.StreamEnd}
	}
	err2 := s.nc.PublishMsg(&nats.Msg{Subject: m.Subject, Header: h, Data: body})
	if errors.Is(err2, nats.ErrMaxPayload) {
		h, body = errorMsg(call.Errorf(call.CodeTooLarge, call.TypeTooLarge, "reply too large"), s.node, "")
		if stream {
			h[protocol.HeaderStream] = []string{protocol.StreamEnd}
		}
		err2 = errors.Join(err2, s.nc.PublishMsg(&nats.Msg{Subject: m.Subject, Header: h, Data: body}))
	}
	return errors.Join(err, err2)
}

// msgSize is about what m takes of the server's max_payload: its body and
// its header block, as nats.go encodes it.
func msgSize(m *nats.Msg) int {
	n := len(m.Data)
	if len(m.Header) > 0 {
		n += headerBytes(m.Header)
	}
	return n
}

// headerBytes is the size of h on the wire, which counts against the max
// payload too.
func headerBytes(h nats.Header) int {
	n := len("NATS/1.0\r\n\r\n")
	for k, vs := range h {
		for _, v := range vs {
			n += len(k) + len(": \r\n") + len(v)
		}
	}
	return n
}
