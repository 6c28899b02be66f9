package main

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

func benchJSON(t *testing.T, r result) benchReport {
	t.Helper()
	if r.code != 0 {
		t.Fatalf("exit %d, stderr %q", r.code, r.stderr)
	}
	var rep benchReport
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatalf("%v in %q", err, r.stdout)
	}
	return rep
}

func TestBench(t *testing.T) {
	s := mustServer(t)
	fakeNode(t, mustConn(t, s), "node-a")

	rep := benchJSON(t, submit(t, s, "", "bench", "-n", "200", "-c", "4", "--json", "echo", `{"x":1}`))
	if rep.Requests != 200 || rep.OK != 200 || len(rep.Errors) != 0 {
		t.Fatalf("got %+v", rep)
	}
	if rep.P50Ms <= 0 || rep.P50Ms > rep.P90Ms || rep.P90Ms > rep.P99Ms || rep.P99Ms > rep.MaxMs || rep.RPS <= 0 {
		t.Fatalf("latencies out of order: %+v", rep)
	}

	// The probe takes the first (odd) answer; of the next 100, the 50 even
	// ones are 503s.
	rep = benchJSON(t, submit(t, s, "", "bench", "-n", "100", "-c", "1", "--json", "flaky"))
	if rep.Requests != 100 || rep.OK != 50 || rep.Errors["503"] != 50 {
		t.Fatalf("got %+v", rep)
	}

	rep = benchJSON(t, submit(t, s, "", "bench", "--duration", "300ms", "-c", "2", "--json", "echo"))
	if rep.Requests == 0 || rep.DurationS < 0.3 {
		t.Fatalf("got %+v", rep)
	}
}

func TestBenchText(t *testing.T) {
	s := mustServer(t)
	fakeNode(t, mustConn(t, s), "node-a")

	r := submit(t, s, "", "bench", "-n", "20", "-c", "2", "echo")
	if r.code != 0 {
		t.Fatalf("exit %d, stderr %q", r.code, r.stderr)
	}
	for _, want := range []string{"pyfleet.req.default.echo: 20 requests", "req/s", "p50", "p90", "p99", "max", "ok          20", "errors      0"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("report lacks %q:\n%s", want, r.stdout)
		}
	}
	if r.stderr != "" {
		t.Errorf("no progress bar when stderr is not a terminal, got %q", r.stderr)
	}
}

func TestBenchRefusesHopelessRuns(t *testing.T) {
	s := mustServer(t)
	fakeNode(t, mustConn(t, s), "node-a")

	r := submit(t, s, "", "bench", "--pool", "nobody", "-n", "10", "echo")
	r.want(t, 3, "")
	if !strings.Contains(r.stderr, "no node serves pyfleet.req.nobody.echo") {
		t.Fatalf("stderr %q", r.stderr)
	}
	r = submit(t, s, "", "bench", "-n", "10", "fail")
	r.want(t, 1, "")
	if r.stderr != "500 RuntimeError: this function always fails\n" {
		t.Fatalf("stderr %q", r.stderr)
	}
}

func TestPercentile(t *testing.T) {
	var samples []time.Duration
	for i := 1; i <= 100; i++ {
		samples = append(samples, time.Duration(i))
	}
	for q, want := range map[float64]time.Duration{0.5: 50, 0.9: 90, 0.99: 99, 1: 100} {
		if got := percentile(samples, q); got != want {
			t.Errorf("p%v = %v, want %v", q*100, got, want)
		}
	}
	if got := percentile(samples[:1], 0.99); got != 1 {
		t.Errorf("one sample: p99 = %v", got)
	}
}
