package metrics_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"net"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"go.uber.org/goleak"

	"github.com/pyfleet/pyfleet/lifecycle"
	"github.com/pyfleet/pyfleet/metrics"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// The method value is what the node hands to the pool as its Events.
var _ lifecycle.Events = (*metrics.Metrics)(nil).Event

// server is a Metrics served on a random loopback port.
type server struct {
	url    string
	client *http.Client
}

// MustServe serves m on 127.0.0.1:0 until the test ends, then checks that
// Serve returned nil.
func MustServe(t *testing.T, m *metrics.Metrics, ready func() (bool, string)) *server {
	t.Helper()
	ln, err := metrics.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Serve(ctx, ln, ready) }()
	tr := &http.Transport{}
	t.Cleanup(func() {
		tr.CloseIdleConnections()
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("Serve did not return after its ctx ended")
		}
	})
	return &server{url: "http://" + ln.Addr().String(), client: &http.Client{Transport: tr, Timeout: 10 * time.Second}}
}

func (s *server) get(t *testing.T, path string) (int, string) {
	t.Helper()
	resp, err := s.client.Get(s.url + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: reading body: %v", path, err)
	}
	return resp.StatusCode, string(body)
}

// scrape fetches /metrics and parses it with the Prometheus text parser.
func (s *server) scrape(t *testing.T) families {
	t.Helper()
	code, body := s.get(t, "/metrics")
	if code != http.StatusOK {
		t.Fatalf("GET /metrics: status %d: %s", code, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("parsing /metrics: %v\n%s", err, body)
	}
	return mfs
}

type families map[string]*dto.MetricFamily

// find returns the metric of family name whose labels include want, or nil.
func (f families) find(name string, want map[string]string) *dto.Metric {
	mf := f[name]
	if mf == nil {
		return nil
	}
next:
	for _, m := range mf.GetMetric() {
		got := map[string]string{}
		for _, l := range m.GetLabel() {
			got[l.GetName()] = l.GetValue()
		}
		for k, v := range want {
			if got[k] != v {
				continue next
			}
		}
		return m
	}
	return nil
}

// counters returns every series of a counter family as "label=value,..." → value,
// leaving out the const labels pool and node.
func (f families) counters(name string) map[string]float64 {
	out := map[string]float64{}
	mf := f[name]
	if mf == nil {
		return out
	}
	for _, m := range mf.GetMetric() {
		var parts []string
		for _, l := range m.GetLabel() {
			if l.GetName() == "pool" || l.GetName() == "node" {
				continue
			}
			parts = append(parts, l.GetName()+"="+l.GetValue())
		}
		sort.Strings(parts)
		out[strings.Join(parts, ",")] = m.GetCounter().GetValue()
	}
	return out
}

func (f families) value(t *testing.T, name string, labels map[string]string) float64 {
	t.Helper()
	m := f.find(name, labels)
	if m == nil {
		t.Fatalf("no %s%v in the scrape", name, labels)
	}
	switch {
	case m.Counter != nil:
		return m.GetCounter().GetValue()
	case m.Gauge != nil:
		return m.GetGauge().GetValue()
	case m.Untyped != nil:
		return m.GetUntyped().GetValue()
	}
	t.Fatalf("%s%v is neither counter nor gauge", name, labels)
	return 0
}

func equalMaps(got, want map[string]float64) bool {
	if len(got) != len(want) {
		return false
	}
	for k, v := range want {
		if g, ok := got[k]; !ok || g != v {
			return false
		}
	}
	return true
}

func TestRequestsCountedExactly(t *testing.T) {
	m := metrics.New("p1", "n1")
	m.SetFunctions([]string{"echo", "sleep", "fail"})
	srv := MustServe(t, m, nil)

	type obs struct {
		fn   string
		code int
		d    time.Duration
		n    int
	}
	observed := []obs{
		{"echo", 200, 300 * time.Microsecond, 1000},
		{"echo", 0, 300 * time.Microsecond, 5}, // 0 is ok too
		{"echo", 400, 2 * time.Millisecond, 7},
		{"sleep", 200, 1500 * time.Millisecond, 3},
		{"sleep", 408, 61 * time.Second, 2},
		{"fail", 500, 20 * time.Millisecond, 11},
		{"nope", 404, 50 * time.Microsecond, 4},    // unknown function: one label for all
		{"garbage", 503, 50 * time.Microsecond, 6}, // not the app's: unknown too
	}
	// Observe from many goroutines at once: the counts must still be exact.
	var wg sync.WaitGroup
	for _, o := range observed {
		for g := range 4 {
			wg.Go(func() {
				for i := g; i < o.n; i += 4 {
					m.ObserveRequest(o.fn, o.code, o.d)
				}
			})
		}
	}
	wg.Wait()

	mfs := srv.scrape(t)
	want := map[string]float64{
		"code=200,function=echo":     1005,
		"code=400,function=echo":     7,
		"code=200,function=sleep":    3,
		"code=408,function=sleep":    2,
		"code=500,function=fail":     11,
		"code=200,function=fail":     0, // SetFunctions starts each ok series at zero
		"code=404,function=_unknown": 4,
		"code=503,function=_unknown": 6,
	}
	if got := mfs.counters("pyfleet_requests_total"); !equalMaps(got, want) {
		t.Errorf("pyfleet_requests_total = %v\nwant %v", got, want)
	}

	// The histogram: count and sum per function, and the buckets.
	for fn, want := range map[string]struct {
		count uint64
		sum   float64
	}{
		"echo":     {1012, 1005*300e-6 + 7*2e-3},
		"sleep":    {5, 3*1.5 + 2*61},
		"fail":     {11, 11 * 20e-3},
		"_unknown": {10, 10 * 50e-6},
	} {
		m := mfs.find("pyfleet_request_duration_seconds", map[string]string{"function": fn})
		if m == nil {
			t.Errorf("no pyfleet_request_duration_seconds for %s", fn)
			continue
		}
		h := m.GetHistogram()
		if h.GetSampleCount() != want.count || math.Abs(h.GetSampleSum()-want.sum) > 1e-9*math.Max(1, want.sum) {
			t.Errorf("duration of %s: count %d sum %g, want %d and %g", fn, h.GetSampleCount(), h.GetSampleSum(), want.count, want.sum)
		}
		var bounds []float64
		for _, b := range h.GetBucket() {
			if !math.IsInf(b.GetUpperBound(), 1) {
				bounds = append(bounds, b.GetUpperBound())
			}
		}
		if bounds[0] != 0.0001 || bounds[len(bounds)-1] != 60 {
			t.Errorf("buckets of %s run from %g to %g, want 0.0001 to 60", fn, bounds[0], bounds[len(bounds)-1])
		}
	}
	sleep := mfs.find("pyfleet_request_duration_seconds", map[string]string{"function": "sleep"}).GetHistogram()
	for _, b := range sleep.GetBucket() {
		// 3 calls of 1.5 s fall in the buckets from 2.5 s on; the two of
		// 61 s only in +Inf.
		want := uint64(0)
		switch {
		case math.IsInf(b.GetUpperBound(), 1):
			want = 5
		case b.GetUpperBound() >= 2.5:
			want = 3
		}
		if b.GetCumulativeCount() != want {
			t.Errorf("sleep bucket le=%g: %d, want %d", b.GetUpperBound(), b.GetCumulativeCount(), want)
		}
	}

	// Every pyfleet_ series carries the const labels.
	for name, mf := range mfs {
		if !strings.HasPrefix(name, "pyfleet_") {
			continue
		}
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["pool"] != "p1" || labels["node"] != "n1" {
				t.Errorf("%s%v lacks pool=p1 node=n1", name, labels)
			}
		}
	}
	// The Go and process collectors are on the registry too.
	for _, name := range []string{"go_goroutines", "process_cpu_seconds_total", "promhttp_metric_handler_requests_total"} {
		if mfs[name] == nil {
			t.Errorf("no %s in the scrape", name)
		}
	}
}

func TestFunctionLabelIsBounded(t *testing.T) {
	t.Run("without SetFunctions", func(t *testing.T) {
		m := metrics.New("p", "n")
		for i := range metrics.MaxFunctions + 10 {
			m.ObserveRequest(fmt.Sprintf("f%d", i), 200, time.Millisecond)
		}
		m.ObserveRequest("f0", 200, time.Millisecond)       // seen before the cap: its own label
		m.ObserveRequest("late", 500, time.Millisecond)     // after the cap: _other
		m.ObserveRequest("whatever", 404, time.Millisecond) // 404: _unknown, cap or not
		got := gather(t, m).counters("pyfleet_requests_total")
		if len(got) != metrics.MaxFunctions+3 {
			t.Errorf("%d series, want %d", len(got), metrics.MaxFunctions+3)
		}
		for k, want := range map[string]float64{
			"code=200,function=f0":       2,
			"code=200,function=_other":   10,
			"code=500,function=_other":   1,
			"code=404,function=_unknown": 1,
		} {
			if got[k] != want {
				t.Errorf("%s = %g, want %g", k, got[k], want)
			}
		}
	})
	t.Run("SetFunctions lifts the cap", func(t *testing.T) {
		m := metrics.New("p", "n")
		var names []string
		for i := range metrics.MaxFunctions + 10 {
			names = append(names, fmt.Sprintf("f%d", i))
		}
		m.SetFunctions(names)
		for _, n := range names {
			m.ObserveRequest(n, 500, time.Millisecond)
		}
		got := gather(t, m).counters("pyfleet_requests_total")
		if len(got) != 2*len(names) || got["code=500,function="+names[len(names)-1]] != 1 {
			t.Errorf("%d series, want %d, each function its own", len(got), 2*len(names))
		}
	})
	t.Run("SetFunctions after calls", func(t *testing.T) {
		m := metrics.New("p", "n")
		m.ObserveRequest("stray", 200, time.Millisecond)
		m.SetFunctions([]string{"echo"})
		m.ObserveRequest("stray", 200, time.Millisecond) // no longer its own label
		m.ObserveRequest("echo", 200, time.Millisecond)
		got := gather(t, m).counters("pyfleet_requests_total")
		want := map[string]float64{
			"code=200,function=stray":    1,
			"code=200,function=_unknown": 1,
			"code=200,function=echo":     1,
		}
		if !equalMaps(got, want) {
			t.Errorf("pyfleet_requests_total = %v, want %v", got, want)
		}
	})
}

func TestEventsCountedByKindAndReason(t *testing.T) {
	m := metrics.New("p", "n")
	var events lifecycle.Events = m.Event
	exit := 1
	for _, e := range []lifecycle.Event{
		{Kind: lifecycle.KindNodeStarted},
		{Kind: lifecycle.KindSpawned}, {Kind: lifecycle.KindSpawned}, {Kind: lifecycle.KindSpawned},
		{Kind: lifecycle.KindReady}, {Kind: lifecycle.KindReady},
		{Kind: lifecycle.KindCrashed, ExitCode: &exit},
		{Kind: lifecycle.KindCrashed, Signal: "SIGKILL"},
		{Kind: lifecycle.KindRestarted},
		{Kind: lifecycle.KindTerminated, Reason: lifecycle.ReasonRecycle},
		{Kind: lifecycle.KindTerminated, Reason: lifecycle.ReasonRecycle},
		{Kind: lifecycle.KindTerminated, Reason: lifecycle.ReasonDeadline},
		{Kind: lifecycle.KindTerminated, Reason: lifecycle.ReasonStop},
		{Kind: lifecycle.KindTerminated},
		{Kind: lifecycle.KindOrphanReaped, PID: 42}, {Kind: lifecycle.KindOrphanReaped, PID: 43},
		{Kind: lifecycle.KindSpawnFailed},
		{Kind: lifecycle.KindCrashLoop},
		{Kind: lifecycle.KindNodeStopping},
		{Kind: lifecycle.KindNodeStopped},
	} {
		events(e)
	}
	mfs := gather(t, m)
	for name, want := range map[string]float64{
		"pyfleet_worker_spawns_total":         3,
		"pyfleet_worker_ready_total":          2,
		"pyfleet_worker_crashes_total":        2,
		"pyfleet_orphans_reaped_total":        2,
		"pyfleet_worker_spawn_failures_total": 1,
		"pyfleet_worker_crash_loops_total":    1,
	} {
		if got := mfs.value(t, name, nil); got != want {
			t.Errorf("%s = %g, want %g", name, got, want)
		}
	}
	want := map[string]float64{
		"reason=recycle":   2,
		"reason=deadline":  1,
		"reason=stop":      1,
		"reason=unhealthy": 0, // every documented reason is there from the start
		"reason=unknown":   1,
	}
	if got := mfs.counters("pyfleet_worker_terminations_total"); !equalMaps(got, want) {
		t.Errorf("pyfleet_worker_terminations_total = %v, want %v", got, want)
	}
	// The crash before the restarted event is its reason; a recycle is a
	// restart by itself.
	want = map[string]float64{
		"reason=crash":        1,
		"reason=recycle":      2,
		"reason=channel_lost": 0,
		"reason=deadline":     0,
		"reason=unhealthy":    0,
	}
	if got := mfs.counters("pyfleet_worker_restarts_total"); !equalMaps(got, want) {
		t.Errorf("pyfleet_worker_restarts_total = %v, want %v", got, want)
	}
}

// TestRestartsCountedByReason feeds the events a pool sends when it replaces
// workers, slots interleaved: each restart is counted under why the
// slot's previous worker ended.
func TestRestartsCountedByReason(t *testing.T) {
	m := metrics.New("p", "n")
	ended := func(worker, reason string) lifecycle.Event {
		if reason == "" {
			return lifecycle.Event{Kind: lifecycle.KindCrashed, Worker: worker, Signal: "SIGKILL"}
		}
		return lifecycle.Event{Kind: lifecycle.KindTerminated, Worker: worker, Reason: reason}
	}
	restarted := func(worker string) lifecycle.Event {
		return lifecycle.Event{Kind: lifecycle.KindRestarted, Worker: worker}
	}
	for _, e := range []lifecycle.Event{
		ended("w1", ""), {Kind: lifecycle.KindSpawnFailed, Worker: "w1"}, restarted("w1"), // a failed start in between changes nothing
		ended("w2", lifecycle.ReasonDeadline), restarted("w2"),
		ended("w3", lifecycle.ReasonChannelLost), restarted("w3"),
		ended("w1", lifecycle.ReasonUnhealthy), restarted("w1"),
		ended("w2", lifecycle.ReasonRecycle), // its replacement serves already; no restarted event follows
		ended("w4", "oom"), restarted("w4"),  // a reason this package does not know yet
		ended("w5", lifecycle.ReasonStop), // stopped with the node: not replaced
		restarted("w6"),                   // no end seen
		ended("w1", ""), ended("w2", ""), restarted("w2"), restarted("w1"),
		ended("w3", lifecycle.ReasonStop), restarted("w3"), // stop forgets the end before it
	} {
		m.Event(e)
	}
	want := map[string]float64{
		"reason=crash":        3,
		"reason=deadline":     1,
		"reason=channel_lost": 1,
		"reason=unhealthy":    1,
		"reason=recycle":      1,
		"reason=oom":          1,
		"reason=unknown":      2,
	}
	if got := gather(t, m).counters("pyfleet_worker_restarts_total"); !equalMaps(got, want) {
		t.Errorf("pyfleet_worker_restarts_total = %v\nwant %v", got, want)
	}
}

func TestJobsCountedByOutcome(t *testing.T) {
	m := metrics.New("p", "n")
	for _, o := range []string{metrics.JobAcked, metrics.JobAcked, metrics.JobAcked, metrics.JobRedelivered, metrics.JobDead, metrics.JobCancelled, "lost"} {
		m.Job(o)
	}
	want := map[string]float64{
		"outcome=acked":       3,
		"outcome=redelivered": 1,
		"outcome=dead":        1,
		"outcome=duplicate":   0,
		"outcome=cancelled":   1,
		"outcome=lost":        1,
	}
	if got := gather(t, m).counters("pyfleet_jobs_total"); !equalMaps(got, want) {
		t.Errorf("pyfleet_jobs_total = %v, want %v", got, want)
	}
}

func TestPoolGaugesReadAtScrape(t *testing.T) {
	m := metrics.New("p", "n")
	srv := MustServe(t, m, nil)

	if mfs := srv.scrape(t); mfs["pyfleet_workers"] != nil {
		t.Errorf("pyfleet_workers before SetPoolStats: %v", mfs["pyfleet_workers"])
	}

	var calls atomic.Int64
	m.SetPoolStats(func() (int, int, int) {
		n := int(calls.Add(1))
		return 4, n, 10 * n
	})
	for scrape := 1; scrape <= 3; scrape++ {
		mfs := srv.scrape(t)
		if got := calls.Load(); got != int64(scrape) {
			t.Fatalf("after %d scrapes stats was called %d times, want once per scrape", scrape, got)
		}
		for name, want := range map[string]float64{
			"pyfleet_workers":      4,
			"pyfleet_workers_busy": float64(scrape),
			"pyfleet_queue_depth":  float64(10 * scrape),
		} {
			labels := map[string]string{"pool": "p", "node": "n"}
			if got := mfs.value(t, name, labels); got != want {
				t.Errorf("scrape %d: %s = %g, want %g", scrape, name, got, want)
			}
			if typ := mfs[name].GetType(); typ != dto.MetricType_GAUGE {
				t.Errorf("%s is a %v, want a gauge", name, typ)
			}
		}
	}
}

func TestSupervisionReadAtScrape(t *testing.T) {
	m := metrics.New("p", "n")
	srv := MustServe(t, m, nil)
	names := []string{"pyfleet_containment", "pyfleet_worker_processes", "pyfleet_processes", "pyfleet_registry_records",
		"pyfleet_orphans_found_at_start_total", "pyfleet_orphans_found_by_sweep_total"}
	mfs := srv.scrape(t)
	for _, name := range names {
		if mfs[name] != nil {
			t.Errorf("%s before it is set: %v", name, mfs[name])
		}
	}

	var procCalls, regCalls, reaperCalls atomic.Int64
	m.SetContainment(lifecycle.ModeGroup)
	m.SetProcessStats(func() (map[string]int, error) {
		n := int(procCalls.Add(1))
		// "": the run's marker without a worker's; in the total only.
		return map[string]int{"w1": 2 + n, "w2": 1, "": 1}, nil
	})
	m.SetRegistryStats(func() (int, error) { return int(regCalls.Add(1)) + 1, nil })
	m.SetReaperStats(func() lifecycle.ReaperStats {
		reaperCalls.Add(1)
		return lifecycle.ReaperStats{AtStart: 4, Periodic: 1}
	})
	for scrape := 1; scrape <= 3; scrape++ {
		mfs := srv.scrape(t)
		for name, calls := range map[string]*atomic.Int64{"processes": &procCalls, "registry": &regCalls, "reaper": &reaperCalls} {
			if got := calls.Load(); got != int64(scrape) {
				t.Fatalf("after %d scrapes the %s function was called %d times, want once per scrape", scrape, name, got)
			}
		}
		for _, c := range []struct {
			name   string
			labels map[string]string
			want   float64
			typ    dto.MetricType
		}{
			{"pyfleet_containment", map[string]string{"mode": "group"}, 1, dto.MetricType_GAUGE},
			{"pyfleet_worker_processes", map[string]string{"worker": "w1"}, float64(2 + scrape), dto.MetricType_GAUGE},
			{"pyfleet_worker_processes", map[string]string{"worker": "w2"}, 1, dto.MetricType_GAUGE},
			{"pyfleet_processes", nil, float64(2+scrape) + 2, dto.MetricType_GAUGE},
			{"pyfleet_registry_records", nil, float64(scrape + 1), dto.MetricType_GAUGE},
			{"pyfleet_orphans_found_at_start_total", nil, 4, dto.MetricType_COUNTER},
			{"pyfleet_orphans_found_by_sweep_total", nil, 1, dto.MetricType_COUNTER},
		} {
			labels := map[string]string{"pool": "p", "node": "n"}
			maps.Copy(labels, c.labels)
			if got := mfs.value(t, c.name, labels); got != c.want {
				t.Errorf("scrape %d: %s%v = %g, want %g", scrape, c.name, c.labels, got, c.want)
			}
			if typ := mfs[c.name].GetType(); typ != c.typ {
				t.Errorf("%s is a %v, want a %v", c.name, typ, c.typ)
			}
		}
		if n := len(mfs["pyfleet_worker_processes"].GetMetric()); n != 2 {
			t.Errorf("%d pyfleet_worker_processes series, want w1 and w2", n)
		}
	}
	if help := srv.scrape(t)["pyfleet_orphans_found_by_sweep_total"].GetHelp(); !strings.Contains(help, "supervision bug") {
		t.Errorf("HELP of pyfleet_orphans_found_by_sweep_total does not say a non-zero count is a supervision bug: %q", help)
	}

	// The mode chosen later replaces the first: one series, never two.
	m.SetContainment(lifecycle.ModeCgroup)
	mfs = srv.scrape(t)
	if cm := mfs["pyfleet_containment"].GetMetric(); len(cm) != 1 || label(cm[0], "mode") != "cgroup" {
		t.Errorf("pyfleet_containment after SetContainment(cgroup): %v", cm)
	}
}

// TestSupervisionScrapeErrors: a count that cannot be read leaves its own
// metrics out of that scrape, says so in the handler's error counter, and
// leaves everything else served.
func TestSupervisionScrapeErrors(t *testing.T) {
	m := metrics.New("p", "n")
	srv := MustServe(t, m, nil)
	m.SetContainment(lifecycle.ModePIDNS)
	m.SetProcessStats(func() (map[string]int, error) { return nil, errors.New("/proc is gone") })
	m.SetRegistryStats(func() (int, error) { return 0, errors.New("registry busy") })
	m.Event(lifecycle.Event{Kind: lifecycle.KindSpawned})

	mfs := srv.scrape(t)
	for _, name := range []string{"pyfleet_processes", "pyfleet_worker_processes", "pyfleet_registry_records"} {
		if mfs[name] != nil {
			t.Errorf("%s served although its count failed: %v", name, mfs[name])
		}
	}
	if got := mfs.value(t, "pyfleet_containment", map[string]string{"mode": "pidns"}); got != 1 {
		t.Errorf("pyfleet_containment{mode=pidns} = %g", got)
	}
	if got := mfs.value(t, "pyfleet_worker_spawns_total", nil); got != 1 {
		t.Errorf("pyfleet_worker_spawns_total = %g, want 1", got)
	}
	// Counted by the scrape that failed, so seen by the next.
	if got := srv.scrape(t).value(t, "promhttp_metric_handler_errors_total", map[string]string{"cause": "gathering"}); got < 1 {
		t.Errorf("promhttp_metric_handler_errors_total{cause=gathering} = %g, want the failed scrape counted", got)
	}
}

func label(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

func TestHealthz(t *testing.T) {
	var ready atomic.Bool
	m := metrics.New("p", "n")
	srv := MustServe(t, m, func() (bool, string) {
		if ready.Load() {
			return true, ""
		}
		return false, "workers starting"
	})

	for _, tc := range []struct {
		ready    bool
		code     int
		contains string
	}{
		{false, http.StatusServiceUnavailable, "workers starting"},
		{true, http.StatusOK, "ok"},
		{false, http.StatusServiceUnavailable, "workers starting"},
	} {
		ready.Store(tc.ready)
		code, body := srv.get(t, "/healthz")
		if code != tc.code || !strings.Contains(body, tc.contains) {
			t.Errorf("ready=%v: /healthz = %d %q, want %d with %q", tc.ready, code, body, tc.code, tc.contains)
		}
	}

	t.Run("nil ready is ready", func(t *testing.T) {
		srv := MustServe(t, metrics.New("p", "n"), nil)
		if code, body := srv.get(t, "/healthz"); code != http.StatusOK || body != "ok\n" {
			t.Errorf("/healthz = %d %q, want 200 \"ok\\n\"", code, body)
		}
	})
	t.Run("not ready without a reason", func(t *testing.T) {
		srv := MustServe(t, metrics.New("p", "n"), func() (bool, string) { return false, "" })
		if code, body := srv.get(t, "/healthz"); code != http.StatusServiceUnavailable || body != "not ready\n" {
			t.Errorf("/healthz = %d %q, want 503 \"not ready\\n\"", code, body)
		}
	})
}

func TestOtherPathsAndMethods(t *testing.T) {
	srv := MustServe(t, metrics.New("p", "n"), nil)
	if code, _ := srv.get(t, "/"); code != http.StatusNotFound {
		t.Errorf("GET / = %d, want 404", code)
	}
	resp, err := srv.client.Post(srv.url+"/metrics", "text/plain", strings.NewReader("x"))
	if err != nil {
		t.Fatalf("POST /metrics: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST /metrics = %d, want 405", resp.StatusCode)
	}
}

func TestListenErrors(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	for _, addr := range []string{"", "127.0.0.1:99999", "no-colon", busy.Addr().String()} {
		ln, err := metrics.Listen(addr)
		if err == nil {
			ln.Close()
			t.Errorf("Listen(%q) = nil error", addr)
		}
	}
}

func TestServeReturnsAfterCancel(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())

	m := metrics.New("p", "n")
	ln, err := metrics.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Serve(ctx, ln, nil) }()

	// A keep-alive connection left open by a client must not hold Serve up.
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	resp, err := client.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	// And a connection that never sends a request holds it up no longer
	// than ShutdownTimeout.
	idle, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()

	start := time.Now()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Serve = %v, want nil", err)
		}
	case <-time.After(metrics.ShutdownTimeout + 5*time.Second):
		t.Fatal("Serve did not return after its ctx ended")
	}
	// The bound above is the check; how long within it is for the log: a
	// shared machine may stall any process for seconds.
	t.Logf("Serve returned %v after cancel", time.Since(start))
	if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		c.Close()
		t.Errorf("the listener still accepts after Serve returned")
	}
}

func TestServeWithCanceledContext(t *testing.T) {
	ln, err := metrics.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := metrics.New("p", "n").Serve(ctx, ln, nil); err != nil {
		t.Errorf("Serve = %v, want nil", err)
	}
	if _, err := ln.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Accept after Serve = %v, want net.ErrClosed", err)
	}
}

func TestServeReportsListenerFailure(t *testing.T) {
	ln, err := metrics.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln.Close()
	err = metrics.New("p", "n").Serve(context.Background(), ln, nil)
	if err == nil || !errors.Is(err, net.ErrClosed) {
		t.Errorf("Serve on a closed listener = %v, want net.ErrClosed", err)
	}
}

// TestConcurrentUse runs every method at once under the race detector.
func TestConcurrentUse(t *testing.T) {
	m := metrics.New("p", "n")
	m.SetPoolStats(func() (int, int, int) { return 1, 0, 0 })
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 200 {
				m.ObserveRequest(fmt.Sprintf("f%d", i%20), 200+g, time.Millisecond)
				m.Event(lifecycle.Event{Kind: lifecycle.KindTerminated, Reason: lifecycle.ReasonRecycle})
				m.Job(metrics.JobAcked)
			}
		})
	}
	wg.Go(func() {
		for range 20 {
			if _, err := m.Registry().Gather(); err != nil {
				t.Errorf("Gather: %v", err)
				return
			}
		}
	})
	wg.Go(func() { m.SetFunctions([]string{"f1", "f2"}) })
	wg.Go(func() {
		for i := range 20 {
			m.SetContainment(lifecycle.ModeGroup)
			m.SetProcessStats(func() (map[string]int, error) { return map[string]int{"w1": i}, nil })
			m.SetRegistryStats(func() (int, error) { return i, nil })
			m.SetReaperStats(func() lifecycle.ReaperStats { return lifecycle.ReaperStats{AtStart: int64(i)} })
			m.Event(lifecycle.Event{Kind: lifecycle.KindCrashed, Worker: "w1"})
			m.Event(lifecycle.Event{Kind: lifecycle.KindRestarted, Worker: "w1"})
		}
	})
	wg.Wait()
	mfs := gather(t, m)
	var total float64
	for _, v := range mfs.counters("pyfleet_requests_total") {
		total += v
	}
	if total != 800 {
		t.Errorf("%g requests counted, want 800", total)
	}
	if got := mfs.value(t, "pyfleet_jobs_total", map[string]string{"outcome": "acked"}); got != 800 {
		t.Errorf("%g jobs acked, want 800", got)
	}
}

func TestObserveRequestDoesNotAllocate(t *testing.T) {
	m := metrics.New("p", "n")
	m.SetFunctions([]string{"echo"})
	m.ObserveRequest("echo", 500, time.Millisecond)
	if n := testing.AllocsPerRun(1000, func() {
		m.ObserveRequest("echo", 200, 250*time.Microsecond)
		m.ObserveRequest("echo", 500, 3*time.Millisecond)
	}); n != 0 {
		t.Errorf("ObserveRequest allocates %g times per call", n/2)
	}
}

// gather parses the registry's text exposition, as a scrape would.
func gather(t *testing.T, m *metrics.Metrics) families {
	t.Helper()
	mfs, err := m.Registry().Gather()
	if err != nil {
		t.Fatalf("Gather: %v", err)
	}
	var b strings.Builder
	enc := expfmt.NewEncoder(&b, expfmt.NewFormat(expfmt.TypeTextPlain))
	for _, mf := range mfs {
		if err := enc.Encode(mf); err != nil {
			t.Fatalf("Encode: %v", err)
		}
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	out, err := p.TextToMetricFamilies(strings.NewReader(b.String()))
	if err != nil {
		t.Fatalf("parsing: %v", err)
	}
	return out
}

func BenchmarkObserveRequest(b *testing.B) {
	m := metrics.New("p", "n")
	m.SetFunctions([]string{"echo", "sleep"})
	b.ReportAllocs()
	for b.Loop() {
		m.ObserveRequest("echo", 200, 420*time.Microsecond)
	}
}

func BenchmarkObserveRequestParallel(b *testing.B) {
	m := metrics.New("p", "n")
	m.SetFunctions([]string{"echo", "sleep"})
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			m.ObserveRequest("echo", 200, 420*time.Microsecond)
		}
	})
}

// BenchmarkObserveRequestUnknownName is the slow path that made-up names take.
func BenchmarkObserveRequestUnknownName(b *testing.B) {
	m := metrics.New("p", "n")
	m.SetFunctions([]string{"echo"})
	b.ReportAllocs()
	for b.Loop() {
		m.ObserveRequest("nope", 404, 50*time.Microsecond)
	}
}

// BenchmarkWithLabelValues is the uncached way, for comparison.
func BenchmarkWithLabelValues(b *testing.B) {
	reqs := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "r"}, []string{"function", "code"})
	dur := prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "d", Buckets: metrics.DurationBuckets}, []string{"function"})
	b.ReportAllocs()
	for b.Loop() {
		reqs.WithLabelValues("echo", strconv.Itoa(200)).Inc()
		dur.WithLabelValues("echo").Observe((420 * time.Microsecond).Seconds())
	}
}
