// Package metrics owns a node's Prometheus metrics and the small HTTP server
// that exposes them (the --metrics flag, README.md "poolnode").
//
// A Metrics holds its own *prometheus.Registry: no package globals, so two
// nodes (or two tests) in one process never share a series. The registry
// carries the Go runtime and process collectors and the pyfleet_* metrics,
// which all have the const labels pool and node:
//
//	pyfleet_requests_total{function,code}          calls answered, code "200" for ok
//	pyfleet_request_duration_seconds{function}     call latency (100 µs .. 60 s buckets)
//	pyfleet_workers, pyfleet_workers_busy,
//	pyfleet_queue_depth                            read from the pool at scrape time
//	pyfleet_worker_spawns_total, _ready_total,
//	_crashes_total, _spawn_failures_total,
//	_crash_loops_total, _terminations_total{reason} lifecycle events (Event)
//	pyfleet_worker_restarts_total{reason}          lifecycle events: crash, or the
//	                                               terminated reason before the restart
//	pyfleet_orphans_reaped_total                   lifecycle events (Event)
//	pyfleet_containment{mode}                      1 for the mode in use (SetContainment)
//	pyfleet_worker_processes{worker},
//	pyfleet_processes                              the workers' whole trees, read at
//	                                               scrape time (SetProcessStats)
//	pyfleet_registry_records                       read at scrape time (SetRegistryStats)
//	pyfleet_orphans_found_at_start_total,
//	pyfleet_orphans_found_by_sweep_total           the reaper's sweeps (SetReaperStats)
//	pyfleet_jobs_total{outcome}                    JetStream jobs settled (Job)
//
// The function label is bounded: a function outside the app's list (see
// SetFunctions), or any call answered 404, is counted as "_unknown", and past
// MaxFunctions distinct names the rest share "_other", so callers cannot
// create series by calling made-up names.
//
// ObserveRequest is on the hot path of every call: it finds its counter and
// histogram in a copy-on-write map without locking or allocating.
//
// Window (window.go) keeps the recent per-function figures behind a node's
// status (docs/protocol.md, "Node status"): calls and errors since the
// node started, and the rate and p50/p99 latency over a recent span (the
// node's is a minute), from a bounded ring of samples per function, with
// the same bound on names as the function label. The node feeds it with
// or without --metrics.
//
// Goroutines: Serve runs an http.Server until its ctx ends and returns only
// once the server has shut down; the package starts no other goroutine.
package metrics
