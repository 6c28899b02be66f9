package metrics

import (
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pyfleet/pyfleet/lifecycle"
)

// SetContainment records the containment mode the node's workers run in
// (lifecycle.ModeCgroup, ModePIDNS or ModeGroup): pyfleet_containment is 1
// with that mode as its label. Until it is set the gauge is absent.
func (m *Metrics) SetContainment(mode string) {
	m.supervision.mode.Store(&mode)
}

// SetProcessStats sets the function that each scrape calls, once, for the
// gauges pyfleet_worker_processes{worker} and pyfleet_processes: the live
// processes of each worker's whole tree by worker, as lifecycle.RunProcesses
// counts them (the key "" counts in the total only). When it fails, that
// scrape leaves both out and counts the error in
// promhttp_metric_handler_errors_total. Until it is set both are absent.
func (m *Metrics) SetProcessStats(fn func() (map[string]int, error)) {
	m.supervision.processes.Store(&fn)
}

// SetRegistryStats sets the function that each scrape calls, once, for
// pyfleet_registry_records: the records in the state dir's registry. When
// it fails, that scrape leaves the gauge out, as SetProcessStats.
func (m *Metrics) SetRegistryStats(fn func() (int, error)) {
	m.supervision.registry.Store(&fn)
}

// SetReaperStats sets the function that each scrape calls, once, for the
// counters pyfleet_orphans_found_at_start_total and
// pyfleet_orphans_found_by_sweep_total (lifecycle.Reaper.Stats).
func (m *Metrics) SetReaperStats(fn func() lifecycle.ReaperStats) {
	m.supervision.reaper.Store(&fn)
}

// supervisionCollector reads what the node's supervision owns at scrape
// time: the containment mode, the processes of its workers, the registry
// and what the reaper found. Each function is called once per scrape; one
// that is not set yet leaves its metrics out.
type supervisionCollector struct {
	mode      atomic.Pointer[string]
	processes atomic.Pointer[func() (map[string]int, error)]
	registry  atomic.Pointer[func() (int, error)]
	reaper    atomic.Pointer[func() lifecycle.ReaperStats]

	containment, workerProcs, procs, records, atStart, bySweep *prometheus.Desc
}

func newSupervisionCollector() *supervisionCollector {
	return &supervisionCollector{
		containment: prometheus.NewDesc("pyfleet_containment",
			"The containment mode that keeps each worker's process tree (cgroup, pidns or group): 1 for the mode in use.",
			[]string{"mode"}, nil),
		workerProcs: prometheus.NewDesc("pyfleet_worker_processes",
			"Live processes of each worker's whole tree: the worker and what it started that the node still ties to it (marker, process group, parent), read at scrape time.",
			[]string{"worker"}, nil),
		procs: prometheus.NewDesc("pyfleet_processes",
			"Live processes of all the workers' trees, read at scrape time.", nil, nil),
		records: prometheus.NewDesc("pyfleet_registry_records",
			"Worker records in the state dir's registry, of every run on that state dir. More records than live workers for long means they leak.",
			nil, nil),
		atStart: prometheus.NewDesc("pyfleet_orphans_found_at_start_total",
			"Processes that dead runs on the state dir left behind, found and killed by the reaper's sweep at the node's start.",
			nil, nil),
		bySweep: prometheus.NewDesc("pyfleet_orphans_found_by_sweep_total",
			"Processes of dead runs found and killed by the reaper's periodic sweep while the node runs. Should stay 0: each one outlived its own run's supervision (its worker's end, the guardian, containment), which is a supervision bug.",
			nil, nil),
	}
}

func (c *supervisionCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.containment
	ch <- c.workerProcs
	ch <- c.procs
	ch <- c.records
	ch <- c.atStart
	ch <- c.bySweep
}

func (c *supervisionCollector) Collect(ch chan<- prometheus.Metric) {
	if mode := c.mode.Load(); mode != nil {
		ch <- prometheus.MustNewConstMetric(c.containment, prometheus.GaugeValue, 1, *mode)
	}
	if fn := c.processes.Load(); fn != nil && *fn != nil {
		if counts, err := (*fn)(); err != nil {
			ch <- prometheus.NewInvalidMetric(c.procs, err)
		} else {
			total := 0
			for worker, n := range counts {
				total += n
				if worker != "" {
					ch <- prometheus.MustNewConstMetric(c.workerProcs, prometheus.GaugeValue, float64(n), worker)
				}
			}
			ch <- prometheus.MustNewConstMetric(c.procs, prometheus.GaugeValue, float64(total))
		}
	}
	if fn := c.registry.Load(); fn != nil && *fn != nil {
		if n, err := (*fn)(); err != nil {
			ch <- prometheus.NewInvalidMetric(c.records, err)
		} else {
			ch <- prometheus.MustNewConstMetric(c.records, prometheus.GaugeValue, float64(n))
		}
	}
	if fn := c.reaper.Load(); fn != nil && *fn != nil {
		st := (*fn)()
		ch <- prometheus.MustNewConstMetric(c.atStart, prometheus.CounterValue, float64(st.AtStart))
		ch <- prometheus.MustNewConstMetric(c.bySweep, prometheus.CounterValue, float64(st.Periodic))
	}
}
