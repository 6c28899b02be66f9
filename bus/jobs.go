package bus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/pyfleet/pyfleet/call"
)

// Defaults of JobsConfig.
const (
	DefaultMaxDeliver = 5
	DefaultAckWait    = 30 * time.Second
	DefaultFetchWait  = 2 * time.Second
)

// DefaultBackOff is how long a failed job waits before its next delivery:
// the first entry after the first failure, the last one for every later one.
var DefaultBackOff = []time.Duration{time.Second, 10 * time.Second, time.Minute, 5 * time.Minute}

// pollInterval is how often a node with no idle capacity looks again: the
// request/reply side frees capacity without telling Jobs.
const pollInterval = 100 * time.Millisecond

// maxBatch bounds one fetch, whatever Capacity says.
const maxBatch = 256

// StreamNames are the JetStream streams of one prefix.
type StreamNames struct {
	Jobs, Results, Dead, Events string
}

// Streams names the streams of prefix: PYFLEET_JOBS and so on for the
// default prefix, <PREFIX>_JOBS for another, so that two prefixes can share
// an account.
func Streams(prefix string) StreamNames {
	base := "PYFLEET"
	if prefix != "" && prefix != DefaultPrefix {
		base = strings.ToUpper(nameBad.ReplaceAllString(prefix, "_"))
	}
	return StreamNames{Jobs: base + "_JOBS", Results: base + "_RESULTS", Dead: base + "_DEAD", Events: base + "_EVENTS"}
}

// nameBad matches what stream and consumer names may not contain (dots,
// wildcards, white space, path separators), and a little more.
var nameBad = regexp.MustCompile(`[^A-Za-z0-9_-]`)

// EnsureStreams creates the streams of SPEC section 4 that are missing. A
// stream that exists is left as it is, since an operator may have tuned it
// (replicas, limits); a warning says when it no longer captures our subjects.
func EnsureStreams(ctx context.Context, nc *nats.Conn, prefix string, log *zap.Logger) error {
	js, err := jetstream.New(nc)
	if err != nil {
		return fmt.Errorf("JetStream: %w", err)
	}
	if log == nil {
		log = zap.NewNop()
	}
	return ensureStreams(ctx, js, Subjects{Prefix: prefix}, 1, log)
}

func ensureStreams(ctx context.Context, js jetstream.JetStream, sub Subjects, replicas int, log *zap.Logger) error {
	names := Streams(sub.Prefix)
	p := sub.prefix()
	for _, cfg := range []jetstream.StreamConfig{{
		Name:        names.Jobs,
		Description: "pyfleet jobs waiting to run",
		Subjects:    []string{p + ".job.>"},
		Retention:   jetstream.WorkQueuePolicy,
		Storage:     jetstream.FileStorage,
		Duplicates:  2 * time.Minute,
	}, {
		Name:        names.Results,
		Description: "pyfleet job results, by job id",
		Subjects:    []string{p + ".result.>"},
		Storage:     jetstream.FileStorage,
		MaxAge:      24 * time.Hour,
		// One result per job id is all a lookup ever reads.
		MaxMsgsPerSubject: 1,
		Duplicates:        2 * time.Minute,
	}, {
		Name:        names.Dead,
		Description: "pyfleet jobs that will not be run again, with their last error",
		Subjects:    []string{p + ".dead.>"},
		Storage:     jetstream.FileStorage,
		Duplicates:  2 * time.Minute,
	}, {
		Name:        names.Events,
		Description: "pyfleet lifecycle events",
		Subjects:    []string{p + ".evt.>"},
		Storage:     jetstream.FileStorage,
		MaxAge:      24 * time.Hour,
	}} {
		cfg.Replicas = max(replicas, 1)
		s, err := js.Stream(ctx, cfg.Name)
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			_, err = js.CreateStream(ctx, cfg)
			if err == nil {
				log.Info("created stream", zap.String("stream", cfg.Name), zap.String("subject", cfg.Subjects[0]))
				continue
			}
			if errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
				// Another node created it in the meantime.
				s, err = js.Stream(ctx, cfg.Name)
			}
		}
		if err != nil {
			return fmt.Errorf("stream %s on %s: %w", cfg.Name, cfg.Subjects[0], err)
		}
		if have := s.CachedInfo().Config.Subjects; !slices.Contains(have, cfg.Subjects[0]) {
			log.Warn("existing stream does not capture pyfleet's subject; left as it is",
				zap.String("stream", cfg.Name), zap.String("subject", cfg.Subjects[0]), zap.Strings("its_subjects", have))
		}
	}
	return nil
}

// JobsConfig configures StartJobs.
type JobsConfig struct {
	Prefix string // empty means DefaultPrefix
	Pool   string
	Node   string
	// MaxDeliver is how many times a job is delivered before it is
	// dead-lettered (--max-deliver); 0 means DefaultMaxDeliver, -1 no limit.
	MaxDeliver int
	// AckWait is the lease on a delivered job; a running job renews it
	// every AckWait/3. 0 means DefaultAckWait.
	AckWait time.Duration
	// BackOff is the delay before a failed job's next delivery, by failure
	// count; nil means DefaultBackOff.
	BackOff []time.Duration
	// DefaultTimeout applies when a job has no Pyfleet-Timeout; 0 means
	// DefaultTimeout. It runs from the job's start, not its submission.
	DefaultTimeout time.Duration
	// MaxTimeout caps a job's Pyfleet-Timeout (the job is dead-lettered as
	// a bad request above it); 0 means DefaultMaxTimeout.
	MaxTimeout time.Duration
	// MaxResultBytes caps a job's result, a streamed job's collected items
	// included (413 and a dead letter beyond); 0 means the connection's max
	// payload.
	MaxResultBytes int
	// Capacity says how many more calls the handler can start now without
	// queueing them (idle worker slots). Jobs fetches at most that many,
	// less the jobs it fetched that have not reached Call yet; 0 or less
	// means fetch nothing for now. Required.
	Capacity func() int
	// FetchWait bounds one pull request; Stop waits for the current one
	// to end. 0 means DefaultFetchWait.
	FetchWait time.Duration
	// Replicas of the streams this node creates when they are missing (in a
	// cluster, 3 lets jobs survive a server's loss); 0 means 1. Streams
	// that exist are left as they are.
	Replicas int
	// Outcome, when set, is told how each delivery ended: "acked",
	// "duplicate" (its result was already stored), "redelivered" or "dead".
	Outcome func(outcome string)
}

func (cfg *JobsConfig) normalize() error {
	if cfg.Prefix != "" {
		if err := ValidPrefix(cfg.Prefix); err != nil {
			return err
		}
	}
	if err := ValidToken(cfg.Pool); err != nil {
		return fmt.Errorf("pool name: %w", err)
	}
	if err := ValidToken(cfg.Node); err != nil {
		return fmt.Errorf("node name: %w", err)
	}
	if cfg.Capacity == nil {
		return errors.New("no Capacity: jobs would be fetched without regard to idle workers")
	}
	switch {
	case cfg.MaxDeliver == 0:
		cfg.MaxDeliver = DefaultMaxDeliver
	case cfg.MaxDeliver < -1:
		return fmt.Errorf("max deliver %d: want a positive number or -1 (no limit)", cfg.MaxDeliver)
	}
	if cfg.AckWait <= 0 {
		cfg.AckWait = DefaultAckWait
	}
	if cfg.BackOff == nil {
		cfg.BackOff = DefaultBackOff
	}
	if cfg.DefaultTimeout <= 0 {
		cfg.DefaultTimeout = DefaultTimeout
	}
	if cfg.MaxTimeout <= 0 {
		cfg.MaxTimeout = DefaultMaxTimeout
	}
	if cfg.MaxResultBytes < 0 {
		return fmt.Errorf("max result bytes %d: want a positive number, or 0 for the NATS max payload", cfg.MaxResultBytes)
	}
	if cfg.FetchWait <= 0 {
		cfg.FetchWait = DefaultFetchWait
	}
	return nil
}

// Jobs runs the JetStream jobs of one pool on one node: a loop that pulls
// only as many jobs as there is idle capacity, and a goroutine per running
// job. See SPEC section 4, "Jobs".
type Jobs struct {
	nc      *nats.Conn
	js      jetstream.JetStream
	h       call.Handler
	cfg     JobsConfig
	subj    Subjects
	streams StreamNames
	funcs   map[string]call.Function
	log     *zap.Logger
	// noReplyTo are the subject trees no Pyfleet-Reply-To may point into.
	noReplyTo []string
	// state is replaced when the consumer is recreated under a running node.
	state      atomic.Pointer[jsState]
	advisories *nats.Subscription

	// abortCtx parents every job's context; it is stored because jobs
	// outlive StartJobs's caller, and cancelling it is how Stop cuts
	// short the jobs its ctx gave no more time to.
	abortCtx context.Context
	abort    context.CancelFunc

	stop     chan struct{} // closed by Stop: fetch no more
	loopDone chan struct{} // closed when the fetch loop has returned
	wake     chan struct{} // size 1: a job finished, capacity may be back
	stopOnce sync.Once

	mu       sync.Mutex
	running  int           // fetched and not yet acked, nak'ed or terminated
	starting int           // fetched and not yet handed to Call
	idle     chan struct{} // closed once stopping with nothing running
	stopping bool
}

// StartJobs makes sure the streams and the pool's durable consumer exist and
// starts pulling jobs; ctx bounds only that setup.
func StartJobs(ctx context.Context, nc *nats.Conn, cfg JobsConfig, h call.Handler, log *zap.Logger) (*Jobs, error) {
	if err := cfg.normalize(); err != nil {
		return nil, fmt.Errorf("jobs: %w", err)
	}
	if log == nil {
		log = zap.NewNop()
	}
	log = log.Named("jobs")
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("jobs: %w", err)
	}
	j := &Jobs{
		nc:        nc,
		js:        js,
		h:         h,
		cfg:       cfg,
		subj:      Subjects{Prefix: cfg.Prefix},
		streams:   Streams(cfg.Prefix),
		funcs:     map[string]call.Function{},
		log:       log,
		noReplyTo: noReplyTo(Subjects{Prefix: cfg.Prefix}),
		stop:      make(chan struct{}),
		loopDone:  make(chan struct{}),
		wake:      make(chan struct{}, 1),
		idle:      make(chan struct{}),
	}
	for _, f := range h.Functions() {
		j.funcs[f.Name] = f
	}
	if err := j.setup(ctx); err != nil {
		return nil, fmt.Errorf("jobs: %w", err)
	}

	// Every node of the pool listens, one of them (a queue group) acts.
	adv := fmt.Sprintf("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.%s.%s", j.streams.Jobs, j.consumerName())
	if j.advisories, err = nc.QueueSubscribe(adv, queueGroup(j.subj, cfg.Pool), j.maxDeliveries); err != nil {
		return nil, fmt.Errorf("jobs: subscribe %s: %w", adv, err)
	}
	j.abortCtx, j.abort = context.WithCancel(context.Background())
	go j.loop()
	log.Info("pulling jobs", zap.String("subject", j.subj.Job(cfg.Pool, ">")), zap.String("consumer", j.consumerName()),
		zap.Int("max_deliver", j.state.Load().maxDeliver))
	return j, nil
}

// setup makes sure the streams and the pool's consumer exist. It runs at
// start and again when the consumer vanishes under a running node (an
// operator deleted it, or the server lost its store).
func (j *Jobs) setup(ctx context.Context) error {
	if err := ensureStreams(ctx, j.js, j.subj, j.cfg.Replicas, j.log); err != nil {
		return err
	}
	var st jsState
	var err error
	if st.jobs, err = j.js.Stream(ctx, j.streams.Jobs); err != nil {
		return fmt.Errorf("stream %s: %w", j.streams.Jobs, err)
	}
	if st.results, err = j.js.Stream(ctx, j.streams.Results); err != nil {
		return fmt.Errorf("stream %s: %w", j.streams.Results, err)
	}
	ccfg := jetstream.ConsumerConfig{
		Durable:       j.consumerName(),
		Description:   "pyfleet jobs of pool " + j.cfg.Pool,
		FilterSubject: j.subj.Job(j.cfg.Pool, ">"),
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       j.cfg.AckWait,
		MaxDeliver:    j.cfg.MaxDeliver,
		// No server-side BackOff: the server would use its entries in
		// place of AckWait as later deliveries' leases, which both delays
		// the redelivery of a job whose node died and stretches the
		// NakWithDelay of a failed one. Failures set their own delay.
	}
	// Create or update: the node started last sets --max-deliver for the
	// pool, rather than the first one forever.
	if st.cons, err = j.js.CreateOrUpdateConsumer(ctx, j.streams.Jobs, ccfg); err != nil {
		return fmt.Errorf("consumer %s on %s: %w", ccfg.Durable, j.streams.Jobs, err)
	}
	st.maxDeliver = st.cons.CachedInfo().Config.MaxDeliver
	j.state.Store(&st)
	return nil
}

func (j *Jobs) consumerName() string {
	base := "pyfleet"
	if j.cfg.Prefix != "" && j.cfg.Prefix != DefaultPrefix {
		base = j.cfg.Prefix
	}
	return nameBad.ReplaceAllString(base+"_"+j.cfg.Pool, "_")
}

// jsState is what setup finds or creates.
type jsState struct {
	cons          jetstream.Consumer
	jobs, results jetstream.Stream
	// maxDeliver is the consumer's, which another node may have set.
	maxDeliver int
}

// Running reports how many jobs this node holds: running, or fetched and
// about to run.
func (j *Jobs) Running() int {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.running
}

// Stop stops fetching (waiting up to FetchWait for the pull request in
// flight; jobs it still brings are handed back at once) and waits until
// every running job is settled or ctx ends. If ctx ends first, the running
// jobs have their contexts cancelled and are handed back for another node
// to run, and Stop returns an error. Stop may be called more than once.
func (j *Jobs) Stop(ctx context.Context) error {
	j.stopOnce.Do(func() {
		close(j.stop)
		if err := j.advisories.Unsubscribe(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) {
			j.log.Warn("unsubscribe advisories", zap.Error(err))
		}
	})
	select {
	case <-j.loopDone:
	case <-ctx.Done():
		j.abort()
		return fmt.Errorf("stop jobs: fetch still in flight: %w", ctx.Err())
	}
	j.mu.Lock()
	if !j.stopping {
		j.stopping = true
		if j.running == 0 {
			close(j.idle)
		}
	}
	j.mu.Unlock()
	select {
	case <-j.idle:
		j.abort()
		return nil
	case <-ctx.Done():
		j.abort()
		return fmt.Errorf("stop jobs: %d jobs still running, cancelled: %w", j.Running(), ctx.Err())
	}
}

func (j *Jobs) stopped() bool {
	select {
	case <-j.stop:
		return true
	default:
		return false
	}
}

// loop pulls jobs while there is idle capacity. It uses Fetch, one pull
// request at a time for no more than the idle capacity, and never Consume
// or Messages: those keep a buffer of jobs filled ahead, and a buffered job
// gets no InProgress, outlives its AckWait and runs twice (nats.go #1929).
func (j *Jobs) loop() {
	defer close(j.loopDone)
	timer := time.NewTimer(pollInterval)
	defer timer.Stop()
	for !j.stopped() {
		n := j.idleSlots()
		if n <= 0 {
			timer.Reset(pollInterval)
			select {
			case <-j.stop:
			case <-j.wake:
			case <-timer.C:
			}
			continue
		}
		batch, err := j.state.Load().cons.Fetch(n, jetstream.FetchMaxWait(j.cfg.FetchWait))
		if err == nil {
			for msg := range batch.Messages() {
				if j.stopped() {
					// Stop came while the pull was open: hand the
					// job back for another node to run now.
					_ = msg.Nak()
					continue
				}
				j.dispatch(msg)
			}
			err = batch.Error()
		}
		if err != nil {
			if errors.Is(err, nats.ErrConnectionClosed) {
				j.log.Error("stop fetching jobs: connection closed")
				return
			}
			j.log.Warn("fetch jobs", zap.Error(err))
			timer.Reset(time.Second)
			select {
			case <-j.stop:
				continue
			case <-timer.C:
			}
			// A pull on a consumer that is gone has no responders.
			if errors.Is(err, jetstream.ErrConsumerDeleted) || errors.Is(err, nats.ErrNoResponders) {
				j.resetup()
			}
		}
	}
}

func (j *Jobs) resetup() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := j.setup(ctx); err != nil {
		j.log.Error("cannot recreate the jobs consumer", zap.Error(err))
		return
	}
	j.log.Warn("jobs consumer recreated", zap.String("consumer", j.consumerName()))
}

func (j *Jobs) idleSlots() int {
	n := j.cfg.Capacity()
	j.mu.Lock()
	n -= j.starting
	j.mu.Unlock()
	return min(n, maxBatch)
}

func (j *Jobs) dispatch(msg jetstream.Msg) {
	j.mu.Lock()
	j.running++
	j.starting++
	j.mu.Unlock()
	go func() {
		defer j.settled()
		j.run(msg)
	}()
}

// started tells the fetch loop that a job reached Call (or will not), so
// that Capacity now accounts for it.
func (j *Jobs) started(once *bool) {
	if *once {
		return
	}
	*once = true
	j.mu.Lock()
	j.starting--
	j.mu.Unlock()
}

func (j *Jobs) settled() {
	j.mu.Lock()
	j.running--
	if j.stopping && j.running == 0 {
		close(j.idle)
	}
	j.mu.Unlock()
	select {
	case j.wake <- struct{}{}:
	default:
	}
}

// HeaderFunction on a stored result names the function of its job. With
// Pyfleet-Job-Id it is how a later delivery of a job knows that a stored
// result is this job's own before it acks the job without running it.
const HeaderFunction = "Pyfleet-Function"

// TypeResultRefused is the error of a job that ran but whose result the
// results stream would not store (full with discard new, say).
const TypeResultRefused = "ResultRefused"

// maxStoredError bounds the message of an error in a dead letter or a stored
// result when the whole one does not fit: an exception's message may quote
// the whole payload.
const maxStoredError = 4096

// job is one delivery of a job being handled.
type job struct {
	msg       jetstream.Msg
	id        string
	seq       uint64 // stream sequence
	function  string
	delivery  uint64
	hdr       nats.Header
	requestID string
	replyTo   string // Pyfleet-Reply-To if the node may publish to it, else ""
	idNote    string // why id is not the job's Nats-Msg-Id, when it is not
	log       *zap.Logger
	endBeat   func()
}

// identify reads who a job is from its headers, using no value the node
// could not carry safely. The id goes into the subjects and headers of the
// job's result and dead letter, so a Nats-Msg-Id that is not a safe header
// value (checkHeaders) gives way to the stream sequence, and idNote says so
// for the dead letter; a bad request id gives way to the id, and a Reply-To
// the node may not publish to is never used.
func (j *Jobs) identify(hdr nats.Header, seq uint64) (id, requestID, replyTo, idNote string) {
	id = header(hdr, HeaderMsgID)
	if id != "" && !safeHeader(HeaderMsgID, id) {
		idNote = fmt.Sprintf("; the job is named by its stream sequence %d instead", seq)
		id = ""
	}
	if id == "" {
		id = strconv.FormatUint(seq, 10)
	}
	requestID = header(hdr, HeaderRequestID)
	if requestID == "" || !safeHeader(HeaderRequestID, requestID) {
		requestID = id
	}
	replyTo = header(hdr, HeaderReplyTo)
	if replyTo != "" && j.checkReplyTo(replyTo) != nil {
		replyTo = ""
	}
	return id, requestID, replyTo, idNote
}

// safeHeader reports whether v passes checkHeaders as the value of name.
func safeHeader(name, v string) bool {
	return checkHeaders(nats.Header{name: {v}}) == nil
}

// admit refuses, before anything else, a job whose headers say it can never
// run: no such job reaches a worker or is delivered again.
func (j *Jobs) admit(jb *job) *call.Error {
	if e := checkHeaders(jb.hdr); e != nil {
		e.Message += jb.idNote
		return e
	}
	if err := ValidToken(jb.id); err != nil {
		return call.Errorf(call.CodeBadRequest, TypeInvalidJobID, "job id (%s) cannot be a subject token: %v", HeaderMsgID, err)
	}
	if to := header(jb.hdr, HeaderReplyTo); to != "" {
		return j.checkReplyTo(to)
	}
	return nil
}

// checkReplyTo refuses a Pyfleet-Reply-To that is not a plain subject (a
// wildcard, an empty token) or that lies where a message means more than a
// result to whoever reads it: in <prefix>.result.> it would be stored as
// another job's result, in .job.> run as a job, in .evt.> and .dead.> read
// as an event or a dead letter, and in $JS.>, $KV.>, $O.> or $SYS.> taken
// as a JetStream API call, a key, an object or a system request.
func (j *Jobs) checkReplyTo(to string) *call.Error {
	if e := checkHeaders(nats.Header{HeaderReplyTo: {to}}); e != nil {
		return e
	}
	for _, tok := range strings.Split(to, ".") {
		if err := ValidToken(tok); err != nil {
			return call.Errorf(call.CodeBadRequest, TypeBadRequest, "header %s: %q is not a subject a result can be sent to: %v", HeaderReplyTo, to, err)
		}
	}
	for _, root := range j.noReplyTo {
		if to == root || strings.HasPrefix(to, root+".") {
			return call.Errorf(call.CodeBadRequest, TypeBadRequest, "header %s: %q is inside %s.>, where the node sends no results", HeaderReplyTo, to, root)
		}
	}
	return nil
}

// noReplyTo lists the subject trees checkReplyTo keeps results out of.
func noReplyTo(sub Subjects) []string {
	p := sub.prefix()
	return []string{p + ".result", p + ".job", p + ".evt", p + ".dead", "$JS", "$KV", "$O", "$SYS"}
}

// jobTimeout reads a job's Pyfleet-Timeout by the same rule as a call's.
func (j *Jobs) jobTimeout(h nats.Header) (time.Duration, *call.Error) {
	return checkTimeout(h, j.cfg.DefaultTimeout, j.cfg.MaxTimeout)
}

// maxResult is the largest result a job may have: MaxResultBytes, and never
// more than the connection's max payload, since a larger one cannot be
// stored.
func (j *Jobs) maxResult() int {
	limit := j.cfg.MaxResultBytes
	if mp := int(j.nc.MaxPayload()); mp > 0 && (limit <= 0 || limit > mp) {
		limit = mp
	}
	if limit <= 0 {
		limit = 1 << 20 // not connected yet: the NATS default max payload
	}
	return limit
}

// run handles one delivery. The order is the at-least-once contract: the
// result is stored (and its store acknowledged) before the job is acked, so
// a node that dies in between leaves a job that the next delivery finds
// done and acks without running it again.
func (j *Jobs) run(msg jetstream.Msg) {
	var startedOnce bool
	defer j.started(&startedOnce)

	meta, err := msg.Metadata()
	if err != nil {
		j.log.Error("job without JetStream metadata; terminated", zap.String("subject", msg.Subject()), zap.Error(err))
		_ = msg.Term()
		return
	}
	jb := &job{msg: msg, seq: meta.Sequence.Stream, delivery: meta.NumDelivered, hdr: msg.Headers()}
	jb.id, jb.requestID, jb.replyTo, jb.idNote = j.identify(jb.hdr, jb.seq)
	jb.function = strings.TrimPrefix(msg.Subject(), j.subj.Job(j.cfg.Pool, ""))
	jb.log = j.log.With(zap.String("job", jb.id), zap.String("function", jb.function), zap.Uint64("delivery", jb.delivery))
	// The lease is kept from the first moment: the lookup below and the
	// queue in the pool both take time.
	jb.endBeat = j.heartbeat(jb)
	defer jb.endBeat()

	if e := j.admit(jb); e != nil {
		j.bury(jb, e)
		return
	}
	if done, err := j.storedResult(jb); err != nil {
		jb.log.Warn("cannot look up a stored result; running the job", zap.Error(err))
	} else if done != nil {
		jb.log.Info("result already stored; acked without running")
		j.forward(jb, done)
		j.ack(jb)
		j.outcome("duplicate")
		return
	}
	fn, ok := j.funcs[jb.function]
	if !ok {
		j.bury(jb, call.Errorf(call.CodeNotFound, TypeNotFound, "no function %q in pool %q", jb.function, j.cfg.Pool))
		return
	}
	timeout, cerr := j.jobTimeout(jb.hdr)
	if cerr == nil && !fn.Raw {
		cerr = checkJSON(msg.Data())
	}
	if cerr != nil {
		j.bury(jb, cerr)
		return
	}

	req := &call.Request{
		Function:  fn.Name,
		Payload:   msg.Data(),
		Session:   header(jb.hdr, HeaderSession),
		RequestID: jb.requestID,
		Deadline:  time.Now().Add(timeout),
	}
	ctx, cancel := context.WithDeadline(j.abortCtx, req.Deadline)
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
	j.started(&startedOnce)
	res, err := j.h.Call(ctx, req, emit)
	if e := col.failure(); e != nil {
		// Whatever the cancelled call returned, this is why it ended;
		// a 413 is permanent.
		j.bury(jb, e)
		return
	}
	if err != nil && j.abortCtx.Err() != nil {
		jb.log.Info("job cut short by stop; handed back")
		jb.endBeat()
		_ = msg.Nak()
		return
	}
	if err != nil {
		e := callError(ctx, err, timeout, j.cfg.Node)
		if e.Code == call.CodeFailed && e.Type == TypeInternal {
			jb.log.Error("job failed", zap.Error(err))
		}
		j.failed(jb, e)
		return
	}

	data, worker := res.Data, res.Worker
	if fn.Stream {
		// A job has one result: the chunks as a JSON array, or end to
		// end for a raw function.
		data = col.join()
		if worker == "" {
			worker = col.worker
		}
	}
	if len(data) > col.limit {
		e := call.Errorf(call.CodeTooLarge, TypeTooLarge, "result of %d bytes is over the limit of %d bytes", len(data), col.limit)
		e.Worker = worker
		j.bury(jb, e)
		return
	}
	out := &nats.Msg{Header: replyHeader(StatusOK, j.cfg.Node, worker, jb.requestID), Data: data}
	if err := j.storeResult(jb.id, jb.function, jb.seq, out); err != nil {
		var e *call.Error
		if errors.As(err, &e) {
			// Too large, or a stream that refuses it: running the job
			// again would end the same way.
			e.Worker = worker
			j.bury(jb, e)
			return
		}
		jb.log.Error("cannot store result; the job will run again", zap.Error(err))
		j.retry(jb)
		return
	}
	j.forward(jb, out)
	j.ack(jb)
	j.outcome("acked")
}

// collector gathers a streamed job's items as they come and refuses the one
// that would make the joined result larger than limit: a generator that
// never ends costs the node one result's worth of memory, not all of it.
type collector struct {
	raw   bool
	limit int

	mu     sync.Mutex
	chunks [][]byte
	size   int // of the joined result so far
	worker string
	err    *call.Error
}

func (c *collector) add(ch call.Chunk) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return c.err
	}
	size := c.size + len(ch.Data)
	if !c.raw {
		if len(c.chunks) == 0 {
			size += 2 // [ and ]
		} else {
			size++ // ,
		}
	}
	if size > c.limit {
		c.err = call.Errorf(call.CodeTooLarge, TypeTooLarge, "streamed result is over the limit of %d bytes after %d items (%d bytes); the call was cancelled",
			c.limit, len(c.chunks), c.size)
		c.err.Worker = ch.Worker
		c.chunks = nil // the job is lost: free it now
		return c.err
	}
	c.size = size
	c.chunks = append(c.chunks, ch.Data)
	c.worker = ch.Worker
	return nil
}

func (c *collector) failure() *call.Error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

func (c *collector) join() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return joinChunks(c.chunks, c.raw, c.size)
}

// failed settles a job whose call failed: at once to the dead letters when
// it can never succeed (the request itself is wrong), after the last
// delivery otherwise, and back to the stream with a delay before that.
func (j *Jobs) failed(jb *job, e *call.Error) {
	maxDeliver := j.state.Load().maxDeliver
	if permanent(e) || (maxDeliver > 0 && jb.delivery >= uint64(maxDeliver)) {
		j.bury(jb, e)
		return
	}
	jb.log.Info("job failed; will be delivered again", zap.Int("code", e.Code), zap.String("type", e.Type), zap.String("error", e.Message))
	j.retry(jb)
}

// permanent reports whether a job that failed with e would fail the same way
// every time.
func permanent(e *call.Error) bool {
	return e.Code == call.CodeBadRequest || e.Code == call.CodeNotFound || e.Code == call.CodeTooLarge || e.Type == TypeResultRefused
}

func (j *Jobs) retry(jb *job) {
	jb.endBeat()
	var delay time.Duration
	if i := min(int(jb.delivery)-1, len(j.cfg.BackOff)-1); i >= 0 {
		delay = j.cfg.BackOff[i]
	}
	if err := jb.msg.NakWithDelay(delay); err != nil {
		jb.log.Warn("nak job", zap.Error(err))
	}
	j.outcome("redelivered")
}

func (j *Jobs) outcome(what string) {
	if j.cfg.Outcome != nil {
		j.cfg.Outcome(what)
	}
}

func (j *Jobs) ack(jb *job) {
	jb.endBeat()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// DoubleAck: the job has left the stream once Running no longer
	// counts it. If the ack is lost, the next delivery finds the result.
	if err := jb.msg.DoubleAck(ctx); err != nil {
		jb.log.Warn("ack job", zap.Error(err))
	}
}

// bury dead-letters jb with its last error and terminates it. The job ends
// here whenever its dead letter or at least its error result is stored.
// When neither is, a job that might still succeed goes back to the stream;
// one that never can (permanent) is terminated all the same, since another
// delivery would only fail, and fail to bury, again.
func (j *Jobs) bury(jb *job, e *call.Error) {
	jb.log.Warn("job dead-lettered", zap.Int("code", e.Code), zap.String("type", e.Type), zap.String("error", e.Message))
	dl := deadLetter{id: jb.id, seq: jb.seq, subject: jb.msg.Subject(), function: jb.function,
		deliveries: jb.delivery, payload: jb.msg.Data(), replyTo: jb.replyTo, requestID: jb.requestID}
	deadErr, resErr := j.publishDead(dl, e)
	switch {
	case deadErr == nil:
	case resErr == nil:
		jb.log.Error("cannot publish the dead letter; the job ends with its error stored as its result", zap.Error(deadErr))
	case !permanent(e):
		jb.log.Error("cannot publish the dead letter nor store the error; the job will be delivered again",
			zap.NamedError("dead_letter", deadErr), zap.NamedError("result", resErr))
		j.retry(jb)
		return
	default:
		jb.log.Error("cannot publish the dead letter nor store the error of a job that can never succeed; the job is dropped",
			zap.Int("code", e.Code), zap.String("error", e.Message), zap.NamedError("dead_letter", deadErr), zap.NamedError("result", resErr))
	}
	jb.endBeat()
	if err := jb.msg.TermWithReason(fmt.Sprintf("%d %s", e.Code, e.Type)); err != nil {
		jb.log.Warn("terminate job", zap.Error(err))
	}
	j.outcome("dead")
}

// deadLetter is what publishDead needs to know of a job.
type deadLetter struct {
	id, subject, function, requestID, replyTo string
	seq, deliveries                           uint64
	payload                                   []byte
}

// publishDead publishes a job with its last error to
// <prefix>.dead.<pool>.<function>, stores that error as the job's result
// and sends it to the job's Reply-To, so that whoever waits for the job
// learns its end; it returns why the dead letter, and why the result, could
// not be stored. A dead letter too large to publish keeps only the start of
// the payload, or none of it (DeadJob.PayloadTruncated), and an error too
// large to store is cut short.
func (j *Jobs) publishDead(dl deadLetter, e *call.Error) (deadErr, resErr error) {
	h, _ := errorMsg(e, j.cfg.Node, dl.requestID)
	h[HeaderJobID] = []string{dl.id}
	h[HeaderMsgID] = []string{dl.id + ":" + strconv.FormatUint(dl.seq, 10)}
	dead := &nats.Msg{Subject: j.subj.Dead(j.cfg.Pool, deadFunction(dl.function)), Header: h}
	short := shortError(e, maxStoredError)
	for _, try := range []struct {
		e    *call.Error
		keep int // bytes of the payload; -1 all
	}{{e, -1}, {short, j.payloadRoom(dead, short, dl)}, {short, 0}} {
		dead.Data = deadBody(try.e, dl, try.keep)
		deadErr = j.jsPublish(dead)
		if r := refusal(deadErr, j.nc); r == nil || !r.tooLarge {
			break
		}
		j.log.Warn("dead letter too large; publishing it with less of the payload", zap.String("job", dl.id),
			zap.Int("bytes", len(dead.Data)), zap.Error(deadErr))
	}

	res := &nats.Msg{}
	if err := ValidToken(dl.id); err != nil {
		resErr = fmt.Errorf("no result stored: %w", err)
	} else {
		for _, ee := range []*call.Error{e, short} {
			res = &nats.Msg{}
			res.Header, res.Data = errorMsg(ee, j.cfg.Node, dl.requestID)
			resErr = j.storeResult(dl.id, dl.function, dl.seq, res)
			var ce *call.Error
			if resErr == nil || !errors.As(resErr, &ce) || ce.Code != call.CodeTooLarge {
				break
			}
		}
		if resErr != nil {
			j.log.Warn("cannot store the error as the job's result", zap.String("job", dl.id), zap.Error(resErr))
		}
	}
	if res.Header == nil {
		res.Header, res.Data = errorMsg(short, j.cfg.Node, dl.requestID)
	}
	j.forwardTo(dl.replyTo, dl.id, res)
	return deadErr, resErr
}

// payloadRoom is how many bytes of dl's payload fit in a dead letter m with
// error e without going over the max payload.
func (j *Jobs) payloadRoom(m *nats.Msg, e *call.Error, dl deadLetter) int {
	room := int(j.nc.MaxPayload()) - headerBytes(m.Header) - len(deadBody(e, dl, 0)) - 64
	// PayloadBytes is base64 in JSON: 4 bytes for every 3.
	return max(room/4*3, 0)
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

// shortError returns e with its message cut to about n bytes.
func shortError(e *call.Error, n int) *call.Error {
	if len(e.Message) <= n {
		return e
	}
	c := *e
	cut := n
	for cut > 0 && !utf8.RuneStart(c.Message[cut]) {
		cut--
	}
	c.Message = fmt.Sprintf("%s… (%d bytes in all)", c.Message[:cut], len(e.Message))
	return &c
}

// deadFunction keeps the dead-letter subject one token long even for a job
// published to pool.a.b, which has no function name.
func deadFunction(f string) string {
	if ValidToken(f) != nil {
		return "_invalid"
	}
	return f
}

// DeadLetter is the body of a dead-lettered job: the error, as in any error
// reply, and the job, so that an operator can see what failed and submit it
// again.
type DeadLetter struct {
	Error ErrorDetail `json:"error"`
	Job   DeadJob     `json:"job"`
}

// DeadJob describes the job in a DeadLetter.
type DeadJob struct {
	ID      string `json:"id"`
	Subject string `json:"subject"`
	// Seq is the job's sequence in the jobs stream (what its submitter's
	// publish acknowledgement said); a job without a usable Nats-Msg-Id
	// is named by it.
	Seq        uint64 `json:"seq"`
	Deliveries uint64 `json:"deliveries"`
	// Payload is the job's body when it is JSON, else PayloadBytes holds
	// it (base64 in JSON).
	Payload      json.RawMessage `json:"payload,omitempty"`
	PayloadBytes []byte          `json:"payload_bytes,omitempty"`
	// PayloadTruncated says that the whole dead letter would have been too
	// large to publish: PayloadBytes holds only the first bytes of the
	// body (maybe none), and PayloadSize its size.
	PayloadTruncated bool `json:"payload_truncated,omitempty"`
	PayloadSize      int  `json:"payload_size,omitempty"`
}

// deadBody is the DeadLetter of dl with error e and keep bytes of its
// payload, or all of it when keep is negative.
func deadBody(e *call.Error, dl deadLetter, keep int) []byte {
	d := DeadLetter{
		Error: ErrorDetail{Code: e.Code, Type: e.Type, Message: e.Message},
		Job:   DeadJob{ID: dl.id, Subject: dl.subject, Seq: dl.seq, Deliveries: dl.deliveries},
	}
	switch {
	case keep >= 0 && keep < len(dl.payload):
		d.Job.PayloadBytes = dl.payload[:keep]
		d.Job.PayloadTruncated = true
		d.Job.PayloadSize = len(dl.payload)
	case json.Valid(dl.payload):
		d.Job.Payload = dl.payload
	default:
		d.Job.PayloadBytes = dl.payload
	}
	b, _ := json.Marshal(d)
	return b
}

// storedResult returns the stored result of jb's job if it succeeded. A
// stored error does not count: it was the final answer to an earlier
// submission, and submitting the job again asks for another try. Nor does a
// result that does not name this job and its function: anyone who can
// publish to the results subjects could have put it there, and running the
// job again is safe where trusting it is not.
func (j *Jobs) storedResult(jb *job) (*nats.Msg, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	raw, err := j.state.Load().results.GetLastMsgForSubject(ctx, j.subj.Result(j.cfg.Pool, jb.id))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if header(raw.Header, HeaderStatus) != StatusOK {
		return nil, nil
	}
	if id, fn := header(raw.Header, HeaderJobID), header(raw.Header, HeaderFunction); id != jb.id || fn != jb.function {
		jb.log.Warn("stored result is not this job's; ignored, the job runs",
			zap.Uint64("result_seq", raw.Sequence), zap.String("its_job", id), zap.String("its_function", fn))
		return nil, nil
	}
	return &nats.Msg{Header: raw.Header, Data: raw.Data}, nil
}

// storeResult stores m as the result of job id and waits for the stream's
// acknowledgement. A result too large for the stream comes back as a 413
// *call.Error, and one the stream refuses (full, with discard new) as a 503
// TypeResultRefused one: the job would end the same way every time.
func (j *Jobs) storeResult(id, function string, seq uint64, m *nats.Msg) error {
	m.Subject = j.subj.Result(j.cfg.Pool, id)
	m.Header[HeaderJobID] = []string{id}
	if ValidToken(function) == nil {
		m.Header[HeaderFunction] = []string{function}
	}
	// The job's stream sequence makes the id unique per submission and the
	// same across redeliveries, so a second store of one run is dropped.
	m.Header[HeaderMsgID] = []string{id + ":" + strconv.FormatUint(seq, 10)}
	err := j.jsPublish(m)
	r := refusal(err, j.nc)
	switch {
	case r == nil:
		return err
	case r.tooLarge:
		return call.Errorf(call.CodeTooLarge, TypeTooLarge, "result of %d bytes cannot be stored: %s", len(m.Data), r.reason)
	default:
		return call.Errorf(call.CodeUnavailable, TypeResultRefused, "the results stream %s refused to store the job's result: %s", j.streams.Results, r.reason)
	}
}

// jsPublish publishes m to a stream and waits for its acknowledgement. A
// stream electing a leader (its server died) stores nothing for a few
// seconds: it sends again, for up to AckWait, which is harmless (m has a
// Nats-Msg-Id) and better than running the job again. A stream that
// answers with a refusal is not asked again.
func (j *Jobs) jsPublish(m *nats.Msg) error {
	giveUp := time.Now().Add(j.cfg.AckWait)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err := j.js.PublishMsg(ctx, m)
		cancel()
		if err == nil || refusal(err, j.nc) != nil || errors.Is(err, nats.ErrConnectionClosed) || time.Now().After(giveUp) {
			return err
		}
		j.log.Warn("cannot store in a stream yet; trying again", zap.String("subject", m.Subject), zap.Error(err))
		time.Sleep(500 * time.Millisecond)
	}
}

// streamRefusal is a publish a stream will refuse again if asked again.
type streamRefusal struct {
	tooLarge bool
	reason   string
}

// refusal says whether err is a stream's refusal to store a message, and
// why: too large for the max payload or the stream's max message size, or
// the stream (or the account) is full and discards new messages.
func refusal(err error, nc *nats.Conn) *streamRefusal {
	if errors.Is(err, nats.ErrMaxPayload) {
		return &streamRefusal{tooLarge: true, reason: fmt.Sprintf("over the NATS max payload of %d bytes", nc.MaxPayload())}
	}
	var ae *jetstream.APIError
	if !errors.As(err, &ae) {
		return nil
	}
	switch ae.ErrorCode {
	case jsErrStreamMessageExceedsMaximum:
		return &streamRefusal{tooLarge: true, reason: ae.Description + " (the stream's max message size)"}
	case jsErrStreamStoreFailed:
		// The same code says "store is closed" while a stream moves or
		// restarts, and that passes.
		switch d := ae.Description; {
		case strings.Contains(d, "too large"):
			return &streamRefusal{tooLarge: true, reason: d}
		case strings.HasPrefix(d, "maximum"): // messages, bytes, messages per subject
			return &streamRefusal{reason: d + " (the stream is full and its discard policy is new)"}
		}
	case jsErrAccountResourcesExceeded, jsErrInsufficientResources:
		return &streamRefusal{reason: ae.Description}
	}
	return nil
}

// JetStream error codes of a publish that storing again would not change
// (nats-server's jetstream_errors_generated.go); jetstream names only some.
const (
	jsErrAccountResourcesExceeded    jetstream.ErrorCode = 10002
	jsErrInsufficientResources       jetstream.ErrorCode = 10023
	jsErrStreamMessageExceedsMaximum                     = jetstream.JSErrCodeStreamMessageExceedsMaximum
	jsErrStreamStoreFailed           jetstream.ErrorCode = 10077
)

// forward sends the result to the job's Pyfleet-Reply-To, if any. Core NATS:
// the result is already stored, so this is a courtesy that may be missed.
func (j *Jobs) forward(jb *job, m *nats.Msg) {
	j.forwardTo(jb.replyTo, jb.id, m)
}

func (j *Jobs) forwardTo(to, id string, m *nats.Msg) {
	if to == "" {
		return
	}
	h := nats.Header{}
	for k, v := range m.Header {
		if k != HeaderMsgID {
			h[k] = v
		}
	}
	h[HeaderJobID] = []string{id}
	if err := j.nc.PublishMsg(&nats.Msg{Subject: to, Header: h, Data: m.Data}); err != nil {
		j.log.Warn("cannot send result to "+HeaderReplyTo, zap.String("job", id), zap.String("subject", to), zap.Error(err))
	}
}

// heartbeat renews jb's lease every AckWait/3 until the returned func is
// called; that func returns once the goroutine has.
func (j *Jobs) heartbeat(jb *job) func() {
	done := make(chan struct{})
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		t := time.NewTicker(j.cfg.AckWait / 3)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				if err := jb.msg.InProgress(); err != nil {
					jb.log.Warn("renew job lease", zap.Error(err))
				}
			}
		}
	}()
	var once sync.Once
	return func() {
		once.Do(func() { close(done) })
		<-exited
	}
}

// maxDeliveries handles the server's advisory that a job reached
// MaxDeliver without being settled: its node died (or stopped) during the
// last delivery, so no node dead-lettered it and the work queue would keep
// it forever, unseen.
func (j *Jobs) maxDeliveries(m *nats.Msg) {
	var adv struct {
		Stream     string `json:"stream"`
		Consumer   string `json:"consumer"`
		StreamSeq  uint64 `json:"stream_seq"`
		Deliveries uint64 `json:"deliveries"`
	}
	if err := json.Unmarshal(m.Data, &adv); err != nil || adv.StreamSeq == 0 {
		j.log.Warn("unreadable max-deliveries advisory", zap.ByteString("advisory", m.Data))
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	jobs := j.state.Load().jobs
	raw, err := jobs.GetMsg(ctx, adv.StreamSeq)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return // settled after all
	}
	if err != nil {
		j.log.Error("cannot read job that reached its delivery limit", zap.Uint64("seq", adv.StreamSeq), zap.Error(err))
		return
	}
	id, rid, replyTo, _ := j.identify(raw.Header, adv.StreamSeq)
	fn := strings.TrimPrefix(raw.Subject, j.subj.Job(j.cfg.Pool, ""))
	e := call.Errorf(call.CodeFailed, "DeliveryLimit", "no node finished the job in %d deliveries (its node stopped or died during the last one)", adv.Deliveries)
	dl := deadLetter{id: id, seq: adv.StreamSeq, subject: raw.Subject, function: fn,
		deliveries: adv.Deliveries, payload: raw.Data, replyTo: replyTo, requestID: rid}
	if deadErr, resErr := j.publishDead(dl, e); deadErr != nil && resErr != nil {
		// Left in the stream, where an operator can still see it.
		j.log.Error("cannot publish dead letter nor store the error", zap.String("job", id),
			zap.NamedError("dead_letter", deadErr), zap.NamedError("result", resErr))
		return
	}
	if err := jobs.DeleteMsg(ctx, adv.StreamSeq); err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
		j.log.Warn("cannot remove dead-lettered job from the stream", zap.String("job", id), zap.Error(err))
	}
	j.log.Warn("job dead-lettered after its delivery limit", zap.String("job", id), zap.String("function", fn))
}

// joinChunks makes one result of a streamed job's chunks; size is its
// length, known beforehand so that the result is allocated once.
func joinChunks(chunks [][]byte, raw bool, size int) []byte {
	b := make([]byte, 0, size)
	if raw {
		for _, c := range chunks {
			b = append(b, c...)
		}
		return b
	}
	b = append(b, '[')
	for i, c := range chunks {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, c...)
	}
	return append(b, ']')
}
