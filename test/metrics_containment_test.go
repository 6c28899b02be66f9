package test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/pyfleet/pyfleet/lifecycle"
)

// scrapeMetrics fetches and parses /metrics at addr.
func scrapeMetrics(t *testing.T, addr string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/metrics: status %d", resp.StatusCode)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("/metrics does not parse: %v", err)
	}
	return families
}

// metricValue is the value of the series of family name whose labels
// include want; ok is false when there is none.
func metricValue(families map[string]*dto.MetricFamily, name string, want map[string]string) (v float64, ok bool) {
next:
	for _, m := range families[name].GetMetric() {
		for k, w := range want {
			if label(m, k) != w {
				continue next
			}
		}
		switch {
		case m.Gauge != nil:
			return m.GetGauge().GetValue(), true
		case m.Counter != nil:
			return m.GetCounter().GetValue(), true
		}
	}
	return 0, false
}

// TestMetricsShowContainmentAndSupervision scrapes a live node: the
// containment mode in use; the processes of each worker's whole tree (the
// worker, a child with a fresh environment in its group, marked children in
// and out of its session); registry records; a kill -9 of a worker counted
// as a restart with reason crash, after which its tree is gone from the
// counts; no orphan found by a sweep. The mode is also in the startup log
// and in `submit nodes`.
func TestMetricsShowContainmentAndSupervision(t *testing.T) {
	addr := freePort(t)
	n := startNode(t, nodeOptions{workers: 2, app: filepath.Join(repoRoot, "test", "apps", "procs.py"), extra: []string{"--metrics", addr}})
	nc := n.connect()

	// The mode auto chose on this host (cgroup as root, pidns without a
	// writable cgroup subtree, else group) is the one reported everywhere.
	mode := ""
	for _, m := range []string{lifecycle.ModeCgroup, lifecycle.ModePIDNS, lifecycle.ModeGroup} {
		if n.hasLog("containment", map[string]string{"mode": m, "asked": lifecycle.ModeAuto}) {
			mode = m
		}
	}
	if mode == "" {
		t.Fatalf("no startup log line containment mode=… asked=auto")
	}

	// want is what each gauge should read; check polls until a scrape
	// shows all of it, since workers and children come and go on their own
	// time.
	type series struct{ name, label, value string } // label "": none

	check := func(what string, want map[series]float64) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for {
			families := scrapeMetrics(t, addr)
			var wrong []string
			for s, w := range want {
				labels := map[string]string{}
				if s.label != "" {
					labels[s.label] = s.value
				}
				if got, ok := metricValue(families, s.name, labels); !ok || got != w {
					wrong = append(wrong, fmt.Sprintf("%s%v = %v (present %v), want %v", s.name, labels, got, ok, w))
				}
			}
			if len(wrong) == 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: after 30 s still %v", what, wrong)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	// Where each worker runs under the init of its PID namespace, the init
	// is one more process of its tree.
	base := 1
	if sup := n.workerPIDs(); len(sup) > 0 && isInit(sup[0]) {
		base = 2
	}
	total := series{"pyfleet_processes", "", ""}
	records := series{"pyfleet_registry_records", "", ""}
	perWorker := func(w string) series { return series{"pyfleet_worker_processes", "worker", w} }
	crashes := series{"pyfleet_worker_restarts_total", "reason", "crash"}
	bySweep := series{"pyfleet_orphans_found_by_sweep_total", "", ""}
	check("at start", map[series]float64{
		{"pyfleet_containment", "mode", mode}: 1,
		total:                                 float64(2 * base), perWorker("w1"): float64(base), perWorker("w2"): float64(base),
		records: 2,
		{"pyfleet_orphans_found_at_start_total", "", ""}: 0,
		bySweep: 0,
		crashes: 0,
	})

	type spawned struct {
		PID    int    `json:"pid"`
		Worker string `json:"worker"`
		Child  int    `json:"child"`
	}
	children := map[string][]lifecycle.Identity{} // by worker
	workerPID := map[string]int{}
	for _, body := range []string{`{"clean": true}`, `{}`, `{"setsid": true}`} {
		var r spawned
		callOK(t, nc, fnSubject("spawn"), body, &r)
		id, err := lifecycle.ReadIdentity(r.Child)
		if err != nil {
			t.Fatalf("child %d of %s: %v", r.Child, body, err)
		}
		children[r.Worker] = append(children[r.Worker], id)
		workerPID[r.Worker] = r.PID
	}
	t.Cleanup(func() {
		// The clean child carries no marker, so assertNoLeftovers cannot
		// see it: it is checked below, and never left to other tests.
		for _, ids := range children {
			for _, id := range ids {
				if id.Alive() {
					_ = syscall.Kill(id.PID, syscall.SIGKILL)
				}
			}
		}
	})
	check("with 3 children", map[series]float64{
		total:           float64(2*base + 3),
		perWorker("w1"): float64(base + len(children["w1"])),
		perWorker("w2"): float64(base + len(children["w2"])),
		records:         2,
	})

	// kill -9 the worker with the most children: it is restarted, and its
	// whole tree leaves the counts.
	var victim string
	for w := range workerPID {
		if victim == "" || len(children[w]) > len(children[victim]) {
			victim = w
		}
	}
	if err := syscall.Kill(workerPID[victim], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	left := 0
	for w, ids := range children {
		if w != victim {
			left += len(ids)
		}
	}
	check("after kill -9 of "+victim, map[series]float64{
		crashes:           1,
		total:             float64(2*base + left),
		perWorker(victim): float64(base),
		records:           2,
		bySweep:           0,
	})
	for _, id := range children[victim] {
		if id.Alive() {
			t.Errorf("child %v outlived its worker", id)
		}
	}

	out, errOut, code := runSubmit(t, n.url, "", "nodes", "--json")
	var nodes []struct {
		Node        string `json:"node"`
		Containment string `json:"containment"`
	}
	if code != 0 || json.Unmarshal([]byte(out), &nodes) != nil || len(nodes) != 1 || nodes[0].Containment != mode {
		t.Errorf("submit nodes --json (exit %d, %s): want containment %s\n%s", code, errOut, mode, out)
	}

	n.signal(syscall.SIGTERM)
	if code := n.wait(30 * time.Second); code != 0 {
		t.Fatalf("exit %d", code)
	}
	for _, ids := range children {
		for _, id := range ids {
			if id.Alive() {
				t.Errorf("child %v outlived the node", id)
			}
		}
	}
}
