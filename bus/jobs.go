package bus

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/protocol"
)

// Defaults of JobsConfig.
const (
	DefaultMaxDeliver = 5
	DefaultAckWait    = 30 * time.Second
	DefaultFetchWait  = 2 * time.Second
)

// defaultBackOff is how long a failed job waits before its next delivery:
// the first entry after the first failure, the last one for every later
// one. normalize gives each JobsConfig a copy, so no caller can change it.
var defaultBackOff = []time.Duration{time.Second, 10 * time.Second, time.Minute, 5 * time.Minute}

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
	// count: the first entry after the first failure, the last one for
	// every later one. nil means 1 s, 10 s, 1 min, 5 min.
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
		if err := protocol.ValidPrefix(cfg.Prefix); err != nil {
			return err
		}
	}
	if err := protocol.ValidToken(cfg.Pool); err != nil {
		return fmt.Errorf("pool name: %w", err)
	}
	if err := protocol.ValidToken(cfg.Node); err != nil {
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
		cfg.BackOff = slices.Clone(defaultBackOff)
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
// job. docs/protocol.md ("Jobs") is the contract it keeps.
type Jobs struct {
	nc      *nats.Conn
	js      jetstream.JetStream
	h       call.Handler
	cfg     JobsConfig
	subj    protocol.Subjects
	streams StreamNames
	funcs   map[string]call.Function
	log     *zap.Logger
	// noReplyTo are the subject trees no Pyfleet-Reply-To may point into.
	noReplyTo []string
	// state is replaced when the consumer is recreated under a running node.
	state      atomic.Pointer[jsState]
	advisories []*nats.Subscription // one per priority's consumer
	// cancels hears the cancel messages of the pool's jobs: every node,
	// since only the one running a job can stop it.
	cancels *nats.Subscription

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
	running  int                  // fetched and not yet acked, nak'ed or terminated
	active   map[string]*delivery // the jobs running here, by id (Progress, cancel)
	starting int                  // fetched and not yet handed to Call
	idle     chan struct{}        // closed once stopping with nothing running
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
		subj:      protocol.Subjects{Prefix: cfg.Prefix},
		streams:   Streams(cfg.Prefix),
		funcs:     map[string]call.Function{},
		log:       log,
		noReplyTo: noReplyTo(protocol.Subjects{Prefix: cfg.Prefix}),
		stop:      make(chan struct{}),
		loopDone:  make(chan struct{}),
		wake:      make(chan struct{}, 1),
		idle:      make(chan struct{}),
		active:    map[string]*delivery{},
	}
	for _, f := range h.Functions() {
		j.funcs[f.Name] = f
	}
	if err := j.setup(ctx); err != nil {
		return nil, fmt.Errorf("jobs: %w", err)
	}

	// Every node of the pool listens, one of them (a queue group) acts.
	for _, p := range protocol.Priorities {
		adv := fmt.Sprintf("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.%s.%s", j.streams.Jobs, j.consumerNameOf(p))
		sub, err := nc.QueueSubscribe(adv, queueGroup(j.subj, cfg.Pool), j.maxDeliveries)
		if err != nil {
			j.unsubscribeAdvisories()
			return nil, fmt.Errorf("jobs: subscribe %s: %w", adv, err)
		}
		j.advisories = append(j.advisories, sub)
	}
	if j.cancels, err = nc.Subscribe(j.subj.CancelJob(cfg.Pool, "*"), j.onCancel); err != nil {
		j.unsubscribeAdvisories()
		return nil, fmt.Errorf("jobs: subscribe %s: %w", j.subj.CancelJob(cfg.Pool, "*"), err)
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
	if err := ensureStreams(ctx, j.js, j.cfg.Prefix, j.cfg.Replicas, j.log); err != nil {
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
	// Create or update: the node started last sets --max-deliver for the
	// pool, rather than the first one forever. The normal level goes first:
	// a node of an older version had it filter the whole pool, which
	// overlaps the other levels, and a work queue stream refuses
	// overlapping consumers.
	byLevel := map[string]jetstream.Consumer{}
	for _, p := range []string{protocol.PriorityNormal, protocol.PriorityHigh, protocol.PriorityLow} {
		ccfg := j.consumerConfig(p)
		if byLevel[p], err = j.js.CreateOrUpdateConsumer(ctx, j.streams.Jobs, ccfg); err != nil {
			return fmt.Errorf("consumer %s on %s: %w", ccfg.Durable, j.streams.Jobs, err)
		}
	}
	for _, p := range protocol.Priorities {
		st.levels = append(st.levels, byLevel[p])
	}
	st.cons = byLevel[protocol.PriorityNormal]
	st.maxDeliver = st.cons.CachedInfo().Config.MaxDeliver
	// Without the bucket (an account that may not create it, say) jobs
	// run all the same; only their status is not kept.
	if st.status, err = ensureStatusBucket(ctx, j.js, j.cfg.Prefix, j.cfg.Replicas, st.results, j.log); err != nil {
		j.log.Warn("job status is not kept", zap.Error(err))
	}
	j.state.Store(&st)
	return nil
}

func (j *Jobs) consumerName() string {
	base := "pyfleet"
	if j.cfg.Prefix != "" && j.cfg.Prefix != protocol.DefaultPrefix {
		base = j.cfg.Prefix
	}
	return safeName(base + "_" + j.cfg.Pool)
}

// consumerNameOf names the consumer of priority p: consumerName for
// normal, as before priorities, and that name with ~high or ~low. No
// consumerName holds a "~" (safeName), so pool "a_high" cannot take pool
// "a"'s high consumer.
func (j *Jobs) consumerNameOf(p string) string {
	if p == protocol.PriorityNormal {
		return j.consumerName()
	}
	return j.consumerName() + "~" + p
}

// consumerConfig is the pool's consumer of priority p. Normal takes the
// subjects without a priority token, and those with more tokens than any
// job has, so that they are still dead-lettered as naming no function;
// high and low take their own token.
func (j *Jobs) consumerConfig(p string) jetstream.ConsumerConfig {
	filters := []string{j.subj.JobPriority(j.cfg.Pool, "*", p)}
	if p == protocol.PriorityNormal {
		filters = append(filters, j.subj.Job(j.cfg.Pool, "*.*.>"))
	}
	return jetstream.ConsumerConfig{
		Durable:        j.consumerNameOf(p),
		Description:    "pyfleet " + p + "-priority jobs of pool " + j.cfg.Pool,
		FilterSubjects: filters,
		AckPolicy:      jetstream.AckExplicitPolicy,
		AckWait:        j.cfg.AckWait,
		MaxDeliver:     j.cfg.MaxDeliver,
		// No server-side BackOff: the server would use its entries in
		// place of AckWait as later deliveries' leases, which both delays
		// the redelivery of a job whose node died and stretches the
		// NakWithDelay of a failed one. Failures set their own delay.
	}
}

// jsState is what setup finds or creates.
type jsState struct {
	cons jetstream.Consumer // the normal level's
	// levels are the consumers of protocol.Priorities, in fetch order.
	levels        []jetstream.Consumer
	jobs, results jetstream.Stream
	// maxDeliver is the consumer's, which another node may have set.
	maxDeliver int
	// status is the jobs' status bucket, nil when it could not be had.
	status jetstream.KeyValue
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
		j.unsubscribeAdvisories()
	})
	select {
	case <-j.loopDone:
	case <-ctx.Done():
		j.abort()
		j.unsubscribeCancels()
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
	// Cancels are heard until the last job has ended.
	defer j.unsubscribeCancels()
	select {
	case <-j.idle:
		j.abort()
		return nil
	case <-ctx.Done():
		j.abort()
		return fmt.Errorf("stop jobs: %d jobs still running, cancelled: %w", j.Running(), ctx.Err())
	}
}

func (j *Jobs) unsubscribeAdvisories() {
	for _, sub := range j.advisories {
		if err := sub.Unsubscribe(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) {
			j.log.Warn("unsubscribe advisories", zap.Error(err))
		}
	}
}

func (j *Jobs) unsubscribeCancels() {
	if err := j.cancels.Unsubscribe(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) && !errors.Is(err, nats.ErrBadSubscription) {
		j.log.Warn("unsubscribe cancels", zap.Error(err))
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
