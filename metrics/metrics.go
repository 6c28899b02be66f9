package metrics

import (
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/pyfleet/pyfleet/lifecycle"
)

// Outcomes of a JetStream job, the outcome label of pyfleet_jobs_total.
const (
	JobAcked       = "acked"       // its result is stored and the job acked
	JobRedelivered = "redelivered" // it failed and will be delivered again
	JobDead        = "dead"        // it went to the dead letters
	JobDuplicate   = "duplicate"   // its result was already stored: not run again
	JobCancelled   = "cancelled"   // cancelled: stopped, or never run
)

// Function labels that stand for more than one name.
const (
	// UnknownFunction labels calls of a function the app does not export.
	UnknownFunction = "_unknown"
	// OtherFunction labels calls of functions past MaxFunctions.
	OtherFunction = "_other"
)

// RestartCrash is the reason label of pyfleet_worker_restarts_total for a
// worker that exited on its own (event crashed); the other reasons are
// those of the terminated event.
const RestartCrash = "crash"

// MaxFunctions bounds the distinct function labels, whatever callers send.
const MaxFunctions = 256

// DurationBuckets are the upper bounds, in seconds, of the request latency
// histogram: from 100 µs (a call to a warm worker) to 60 s (the default
// deadline), about two and a half per decade.
var DurationBuckets = []float64{
	0.0001, 0.00025, 0.0005,
	0.001, 0.0025, 0.005,
	0.01, 0.025, 0.05,
	0.1, 0.25, 0.5,
	1, 2.5, 5,
	10, 30, 60,
}

// Metrics is one node's metrics. Its methods are safe for concurrent use.
type Metrics struct {
	reg *prometheus.Registry

	requests *prometheus.CounterVec
	duration *prometheus.HistogramVec

	// children maps (function, code) to its counter and observer. It is
	// replaced, never changed, so ObserveRequest reads it without a lock;
	// mu serialises the writers, which run once per new pair.
	children atomic.Pointer[map[reqKey]*reqChild]
	// known is the app's function names (SetFunctions); nil: not given.
	known atomic.Pointer[map[string]struct{}]
	mu    sync.Mutex
	names map[string]struct{} // function labels in use; guarded by mu

	spawns, ready, crashes, orphans, spawnFailures, crashLoops prometheus.Counter
	terminations                                               *prometheus.CounterVec
	termReasons                                                map[string]prometheus.Counter
	restarts                                                   *prometheus.CounterVec
	restartReasons                                             map[string]prometheus.Counter
	// ended is why each worker slot's last process ended (RestartCrash or
	// a termination reason), until the restarted event that replaces it.
	// It holds one entry per slot at most.
	ended   map[string]string
	endedMu sync.Mutex

	jobs        *prometheus.CounterVec
	jobOutcomes map[string]prometheus.Counter

	pool        *poolCollector
	supervision *supervisionCollector
}

type reqKey struct {
	function string
	code     int
}

type reqChild struct {
	count prometheus.Counter
	dur   prometheus.Observer
}

// New returns the metrics of node in pool, on a registry of their own that
// also holds the Go runtime and process collectors.
func New(pool, node string) *Metrics {
	m := &Metrics{
		reg:   prometheus.NewRegistry(),
		names: map[string]struct{}{},
	}
	empty := map[reqKey]*reqChild{}
	m.children.Store(&empty)

	m.reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	reg := prometheus.WrapRegistererWith(prometheus.Labels{"pool": pool, "node": node}, m.reg)

	m.requests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "pyfleet_requests_total",
		Help: `Calls answered, by function and code ("200" for ok, else the error code).`,
	}, []string{"function", "code"})
	m.duration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "pyfleet_request_duration_seconds",
		Help:    "Time from a call's arrival at the node to its answer, by function.",
		Buckets: DurationBuckets,
	}, []string{"function"})

	counter := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Name: name, Help: help})
	}
	m.spawns = counter("pyfleet_worker_spawns_total", "Worker processes started (event spawned).")
	m.ready = counter("pyfleet_worker_ready_total", "Workers that became ready to serve (event ready).")
	m.crashes = counter("pyfleet_worker_crashes_total", "Workers that exited on their own (event crashed).")
	m.orphans = counter("pyfleet_orphans_reaped_total", "Processes of a dead node or worker found and killed (event orphan_reaped).")
	m.spawnFailures = counter("pyfleet_worker_spawn_failures_total", "Worker starts that failed (event spawn_failed).")
	m.crashLoops = counter("pyfleet_worker_crash_loops_total", "Worker slots that crashed repeatedly in a row (event crash_loop).")
	m.terminations = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "pyfleet_worker_terminations_total",
		Help: "Workers stopped on purpose (event terminated), by reason: stop, recycle, deadline, unhealthy.",
	}, []string{"reason"})
	m.termReasons = map[string]prometheus.Counter{}
	for _, r := range []string{lifecycle.ReasonStop, lifecycle.ReasonRecycle, lifecycle.ReasonDeadline, lifecycle.ReasonUnhealthy} {
		m.termReasons[r] = m.terminations.WithLabelValues(r)
	}
	m.restarts = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "pyfleet_worker_restarts_total",
		Help: "Workers replaced by a new one, by why the old one ended: crash, or the reason of its terminated event (channel_lost, deadline, unhealthy, recycle, ...).",
	}, []string{"reason"})
	m.restartReasons = map[string]prometheus.Counter{}
	for _, r := range []string{RestartCrash, lifecycle.ReasonChannelLost, lifecycle.ReasonDeadline, lifecycle.ReasonUnhealthy, lifecycle.ReasonRecycle} {
		m.restartReasons[r] = m.restarts.WithLabelValues(r)
	}
	m.ended = map[string]string{}

	m.jobs = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "pyfleet_jobs_total",
		Help: "JetStream jobs settled, by outcome: acked, redelivered, dead, duplicate, cancelled.",
	}, []string{"outcome"})
	m.jobOutcomes = map[string]prometheus.Counter{}
	for _, o := range []string{JobAcked, JobRedelivered, JobDead, JobDuplicate, JobCancelled} {
		m.jobOutcomes[o] = m.jobs.WithLabelValues(o)
	}

	m.pool = newPoolCollector()
	m.supervision = newSupervisionCollector()
	reg.MustRegister(
		m.requests, m.duration,
		m.spawns, m.ready, m.crashes, m.restarts, m.orphans, m.spawnFailures, m.crashLoops,
		m.terminations, m.jobs, m.pool, m.supervision,
	)
	return m
}

// Registry is the registry that holds every metric of the node; Serve
// exposes it, and a caller may register more collectors on it.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// ObserveRequest counts one answered call of function with code (200 for
// ok, else the error code; 0 counts as 200) that took d. It neither locks
// nor allocates once the (function, code) pair has been seen.
func (m *Metrics) ObserveRequest(function string, code int, d time.Duration) {
	if code == 0 {
		code = 200
	}
	c, ok := (*m.children.Load())[reqKey{function, code}]
	if !ok {
		c = m.child(function, code)
	}
	c.count.Inc()
	c.dur.Observe(d.Seconds())
}

// child is ObserveRequest's slow path: it maps function to its label and
// finds or makes the pair's metrics. Made-up names are never keys of the
// map, so they do not grow it.
func (m *Metrics) child(function string, code int) *reqChild {
	if c, ok := (*m.children.Load())[reqKey{m.label(function, code), code}]; ok {
		return c
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	label := m.label(function, code) // again: SetFunctions may have run since
	if _, ok := m.names[label]; !ok && m.known.Load() == nil && label != UnknownFunction && len(m.names) >= MaxFunctions {
		label = OtherFunction
	}
	return m.addLocked(reqKey{label, code})
}

// label is function's label: UnknownFunction for a 404, an empty name or,
// once SetFunctions has run, a name the app does not export.
func (m *Metrics) label(function string, code int) string {
	if function == "" || code == 404 {
		return UnknownFunction
	}
	if known := m.known.Load(); known != nil {
		if _, ok := (*known)[function]; !ok {
			return UnknownFunction
		}
	}
	return function
}

// addLocked returns key's metrics, making them (and a new copy of the map)
// if they are missing. m.mu must be held.
func (m *Metrics) addLocked(key reqKey) *reqChild {
	old := *m.children.Load()
	if c, ok := old[key]; ok {
		return c
	}
	c := &reqChild{
		count: m.requests.WithLabelValues(key.function, strconv.Itoa(key.code)),
		dur:   m.duration.WithLabelValues(key.function),
	}
	next := make(map[reqKey]*reqChild, len(old)+1)
	for k, v := range old {
		next[k] = v
	}
	next[key] = c
	m.children.Store(&next)
	m.names[key.function] = struct{}{}
	return c
}

// SetFunctions names the functions the app exports; calls of any other name
// are then counted as UnknownFunction. Each function's ok series starts at
// zero, so rates work from the first call. A node calls it once its workers
// are ready, before it serves; without it, the first MaxFunctions names seen
// become labels.
func (m *Metrics) SetFunctions(names []string) {
	known := make(map[string]struct{}, len(names))
	for _, n := range names {
		if n != "" {
			known[n] = struct{}{}
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.known.Store(&known)
	// Forget the cached pairs of other names, so they are looked up (and
	// labelled UnknownFunction) again; the series counted so far stay.
	next := map[reqKey]*reqChild{}
	m.names = map[string]struct{}{}
	for k, v := range *m.children.Load() {
		if _, ok := known[k.function]; ok || k.function == UnknownFunction {
			next[k] = v
			m.names[k.function] = struct{}{}
		}
	}
	m.children.Store(&next)
	for n := range known {
		m.addLocked(reqKey{n, 200})
	}
}

// Event counts a lifecycle event. Its method value is a lifecycle.Events;
// node events (node_started, ...) are not counted.
func (m *Metrics) Event(e lifecycle.Event) {
	switch e.Kind {
	case lifecycle.KindSpawned:
		m.spawns.Inc()
	case lifecycle.KindReady:
		m.ready.Inc()
	case lifecycle.KindCrashed:
		m.crashes.Inc()
		m.workerEnded(e.Worker, RestartCrash)
	case lifecycle.KindRestarted:
		m.restarted(e.Worker)
	case lifecycle.KindOrphanReaped:
		m.orphans.Inc()
	case lifecycle.KindSpawnFailed:
		m.spawnFailures.Inc()
	case lifecycle.KindCrashLoop:
		m.crashLoops.Inc()
	case lifecycle.KindTerminated:
		m.workerEnded(e.Worker, e.Reason)
		if c, ok := m.termReasons[e.Reason]; ok {
			c.Inc()
			return
		}
		reason := e.Reason
		if reason == "" {
			reason = "unknown"
		}
		m.terminations.WithLabelValues(reason).Inc()
	}
}

// workerEnded notes why worker's process ended, for the restart that
// replaces it. A recycled worker's replacement already serves when the old
// one ends, and no restarted event follows: that is the restart. A worker
// stopped with the node is not replaced.
func (m *Metrics) workerEnded(worker, reason string) {
	switch reason {
	case lifecycle.ReasonRecycle:
		m.restart(reason)
		return
	case lifecycle.ReasonStop:
		reason = ""
	case "":
		reason = "unknown"
	}
	m.endedMu.Lock()
	defer m.endedMu.Unlock()
	if reason == "" {
		delete(m.ended, worker)
		return
	}
	m.ended[worker] = reason
}

// restarted counts the restart of worker by why its last process ended.
func (m *Metrics) restarted(worker string) {
	m.endedMu.Lock()
	reason, ok := m.ended[worker]
	delete(m.ended, worker)
	m.endedMu.Unlock()
	if !ok {
		reason = "unknown"
	}
	m.restart(reason)
}

func (m *Metrics) restart(reason string) {
	if c, ok := m.restartReasons[reason]; ok {
		c.Inc()
		return
	}
	m.restarts.WithLabelValues(reason).Inc()
}

// Job counts a settled job by outcome: JobAcked, JobRedelivered, JobDead or
// JobDuplicate.
func (m *Metrics) Job(outcome string) {
	if c, ok := m.jobOutcomes[outcome]; ok {
		c.Inc()
		return
	}
	m.jobs.WithLabelValues(outcome).Inc()
}

// SetPoolStats sets the function that each scrape calls, once, for the
// gauges pyfleet_workers, pyfleet_workers_busy and pyfleet_queue_depth.
// Until it is set those gauges are absent.
func (m *Metrics) SetPoolStats(stats func() (workers, busy, queued int)) {
	m.pool.stats.Store(&stats)
}

// poolCollector reads the pool's gauges at scrape time, with one call of
// the stats function so the three are one snapshot.
type poolCollector struct {
	stats                atomic.Pointer[func() (workers, busy, queued int)]
	workers, busy, queue *prometheus.Desc
}

func newPoolCollector() *poolCollector {
	return &poolCollector{
		workers: prometheus.NewDesc("pyfleet_workers", "Live worker processes.", nil, nil),
		busy:    prometheus.NewDesc("pyfleet_workers_busy", "Workers running at least one call.", nil, nil),
		queue:   prometheus.NewDesc("pyfleet_queue_depth", "Calls waiting for a free worker.", nil, nil),
	}
}

func (c *poolCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.workers
	ch <- c.busy
	ch <- c.queue
}

func (c *poolCollector) Collect(ch chan<- prometheus.Metric) {
	stats := c.stats.Load()
	if stats == nil || *stats == nil {
		return
	}
	workers, busy, queued := (*stats)()
	ch <- prometheus.MustNewConstMetric(c.workers, prometheus.GaugeValue, float64(workers))
	ch <- prometheus.MustNewConstMetric(c.busy, prometheus.GaugeValue, float64(busy))
	ch <- prometheus.MustNewConstMetric(c.queue, prometheus.GaugeValue, float64(queued))
}
