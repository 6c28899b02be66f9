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
		nc:       nc,
		js:       js,
		h:        h,
		cfg:      cfg,
		subj:     Subjects{Prefix: cfg.Prefix},
		streams:  Streams(cfg.Prefix),
		funcs:    map[string]call.Function{},
		log:      log,
		stop:     make(chan struct{}),
		loopDone: make(chan struct{}),
		wake:     make(chan struct{}, 1),
		idle:     make(chan struct{}),
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

// job is one delivery of a job being handled.
type job struct {
	msg       jetstream.Msg
	id        string
	seq       uint64 // stream sequence
	function  string
	delivery  uint64
	hdr       nats.Header
	requestID string
	log       *zap.Logger
	endBeat   func()
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
	jb.id = header(jb.hdr, HeaderMsgID)
	if jb.id == "" {
		jb.id = strconv.FormatUint(jb.seq, 10)
	}
	jb.requestID = header(jb.hdr, HeaderRequestID)
	if jb.requestID == "" {
		jb.requestID = jb.id
	}
	jb.function = strings.TrimPrefix(msg.Subject(), j.subj.Job(j.cfg.Pool, ""))
	jb.log = j.log.With(zap.String("job", jb.id), zap.String("function", jb.function), zap.Uint64("delivery", jb.delivery))
	// The lease is kept from the first moment: the lookup below and the
	// queue in the pool both take time.
	jb.endBeat = j.heartbeat(jb)
	defer jb.endBeat()

	if err := ValidToken(jb.id); err != nil {
		j.bury(jb, call.Errorf(call.CodeBadRequest, TypeInvalidJobID, "job id (%s) cannot be a subject token: %v", HeaderMsgID, err))
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
	timeout, cerr := parseTimeout(jb.hdr, j.cfg.DefaultTimeout)
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
	var chunks [][]byte
	var worker string
	emit := func(ch call.Chunk) error {
		chunks = append(chunks, ch.Data)
		worker = ch.Worker
		return nil
	}
	j.started(&startedOnce)
	res, err := j.h.Call(ctx, req, emit)
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

	out := &nats.Msg{Header: replyHeader(StatusOK, j.cfg.Node, res.Worker, jb.requestID), Data: res.Data}
	if fn.Stream {
		// A job has one result: the chunks as a JSON array, or end to
		// end for a raw function.
		out.Data = joinChunks(chunks, fn.Raw)
		if res.Worker == "" && worker != "" {
			out.Header[HeaderWorker] = []string{worker}
		}
	}
	if err := j.storeResult(jb.id, jb.seq, out); err != nil {
		var e *call.Error
		if errors.As(err, &e) {
			j.failed(jb, e)
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

// failed settles a job whose call failed: at once to the dead letters when
// it can never succeed (the request itself is wrong), after the last
// delivery otherwise, and back to the stream with a delay before that.
func (j *Jobs) failed(jb *job, e *call.Error) {
	permanent := e.Code == call.CodeBadRequest || e.Code == call.CodeNotFound || e.Code == call.CodeTooLarge
	maxDeliver := j.state.Load().maxDeliver
	if permanent || (maxDeliver > 0 && jb.delivery >= uint64(maxDeliver)) {
		j.bury(jb, e)
		return
	}
	jb.log.Info("job failed; will be delivered again", zap.Int("code", e.Code), zap.String("type", e.Type), zap.String("error", e.Message))
	j.retry(jb)
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

// bury dead-letters jb with its last error and terminates it.
func (j *Jobs) bury(jb *job, e *call.Error) {
	jb.log.Warn("job dead-lettered", zap.Int("code", e.Code), zap.String("type", e.Type), zap.String("error", e.Message))
	dl := deadLetter{id: jb.id, seq: jb.seq, subject: jb.msg.Subject(), function: jb.function,
		deliveries: jb.delivery, payload: jb.msg.Data(), hdr: jb.hdr, requestID: jb.requestID}
	if err := j.publishDead(dl, e); err != nil {
		// Without a dead letter the job must stay in the stream rather
		// than vanish: leave it to be delivered again.
		jb.log.Error("cannot publish dead letter; the job will be delivered again", zap.Error(err))
		j.retry(jb)
		return
	}
	jb.endBeat()
	if err := jb.msg.TermWithReason(fmt.Sprintf("%d %s", e.Code, e.Type)); err != nil {
		jb.log.Warn("terminate job", zap.Error(err))
	}
	j.outcome("dead")
}

// deadLetter is what publishDead needs to know of a job.
type deadLetter struct {
	id, subject, function, requestID string
	seq, deliveries                  uint64
	payload                          []byte
	hdr                              nats.Header
}

// publishDead publishes a job with its last error to
// <prefix>.dead.<pool>.<function> and waits for the stream to store it; then
// it stores that error as the job's result and sends it to the job's
// Pyfleet-Reply-To, so that whoever waits for the job learns its end.
func (j *Jobs) publishDead(dl deadLetter, e *call.Error) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	h, _ := errorMsg(e, j.cfg.Node, dl.requestID)
	h[HeaderJobID] = []string{dl.id}
	h[HeaderMsgID] = []string{dl.id + ":" + strconv.FormatUint(dl.seq, 10)}
	dead := &nats.Msg{
		Subject: j.subj.Dead(j.cfg.Pool, deadFunction(dl.function)),
		Header:  h,
		Data:    deadBody(e, dl),
	}
	if _, err := j.js.PublishMsg(ctx, dead); err != nil {
		return err
	}
	res := &nats.Msg{}
	res.Header, res.Data = errorMsg(e, j.cfg.Node, dl.requestID)
	if ValidToken(dl.id) == nil {
		if err := j.storeResult(dl.id, dl.seq, res); err != nil {
			j.log.Warn("cannot store the error as the job's result", zap.String("job", dl.id), zap.Error(err))
		}
	}
	j.forwardTo(header(dl.hdr, HeaderReplyTo), dl.id, res)
	return nil
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
	ID         string `json:"id"`
	Subject    string `json:"subject"`
	Deliveries uint64 `json:"deliveries"`
	// Payload is the job's body when it is JSON, else PayloadBytes holds
	// it (base64 in JSON).
	Payload      json.RawMessage `json:"payload,omitempty"`
	PayloadBytes []byte          `json:"payload_bytes,omitempty"`
}

func deadBody(e *call.Error, dl deadLetter) []byte {
	d := DeadLetter{
		Error: ErrorDetail{Code: e.Code, Type: e.Type, Message: e.Message},
		Job:   DeadJob{ID: dl.id, Subject: dl.subject, Deliveries: dl.deliveries},
	}
	if json.Valid(dl.payload) {
		d.Job.Payload = dl.payload
	} else {
		d.Job.PayloadBytes = dl.payload
	}
	b, _ := json.Marshal(d)
	return b
}

// storedResult returns the stored result of jb's job if it succeeded. A
// stored error does not count: it was the final answer to an earlier
// submission, and submitting the job again asks for another try.
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
	return &nats.Msg{Header: raw.Header, Data: raw.Data}, nil
}

// storeResult stores m as the result of job id and waits for the stream's
// acknowledgement. A result over the size limit comes back as a 413
// *call.Error: the job would fail the same way every time.
func (j *Jobs) storeResult(id string, seq uint64, m *nats.Msg) error {
	m.Subject = j.subj.Result(j.cfg.Pool, id)
	m.Header[HeaderJobID] = []string{id}
	// The job's stream sequence makes the id unique per submission and the
	// same across redeliveries, so a second store of one run is dropped.
	m.Header[HeaderMsgID] = []string{id + ":" + strconv.FormatUint(seq, 10)}
	// A stream electing a leader (its server died) stores nothing for a
	// few seconds. Sending again is harmless (the Nats-Msg-Id above) and
	// better than running the job again; the lease is kept meanwhile.
	giveUp := time.Now().Add(j.cfg.AckWait)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err := j.js.PublishMsg(ctx, m)
		cancel()
		if errors.Is(err, nats.ErrMaxPayload) {
			return call.Errorf(call.CodeTooLarge, TypeTooLarge, "result of %d bytes is over the limit of %d bytes", len(m.Data), j.nc.MaxPayload())
		}
		if err == nil || errors.Is(err, nats.ErrConnectionClosed) || time.Now().After(giveUp) {
			return err
		}
		j.log.Warn("cannot store result yet; trying again", zap.String("job", id), zap.Error(err))
		time.Sleep(500 * time.Millisecond)
	}
}

// forward sends the result to the job's Pyfleet-Reply-To, if any. Core NATS:
// the result is already stored, so this is a courtesy that may be missed.
func (j *Jobs) forward(jb *job, m *nats.Msg) {
	j.forwardTo(header(jb.hdr, HeaderReplyTo), jb.id, m)
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
	id := header(raw.Header, HeaderMsgID)
	if id == "" {
		id = strconv.FormatUint(adv.StreamSeq, 10)
	}
	rid := header(raw.Header, HeaderRequestID)
	if rid == "" {
		rid = id
	}
	fn := strings.TrimPrefix(raw.Subject, j.subj.Job(j.cfg.Pool, ""))
	e := call.Errorf(call.CodeFailed, "DeliveryLimit", "no node finished the job in %d deliveries (its node stopped or died during the last one)", adv.Deliveries)
	dl := deadLetter{id: id, seq: adv.StreamSeq, subject: raw.Subject, function: fn,
		deliveries: adv.Deliveries, payload: raw.Data, hdr: raw.Header, requestID: rid}
	if err := j.publishDead(dl, e); err != nil {
		j.log.Error("cannot publish dead letter", zap.String("job", id), zap.Error(err))
		return
	}
	if err := jobs.DeleteMsg(ctx, adv.StreamSeq); err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
		j.log.Warn("cannot remove dead-lettered job from the stream", zap.String("job", id), zap.Error(err))
	}
	j.log.Warn("job dead-lettered after its delivery limit", zap.String("job", id), zap.String("function", fn))
}

// joinChunks makes one result of a streamed job's chunks.
func joinChunks(chunks [][]byte, raw bool) []byte {
	var b []byte
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
