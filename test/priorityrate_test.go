package test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pyfleet/pyfleet/client"
)

func ratePriApp() string { return filepath.Join(repoRoot, "test", "apps", "ratepri.py") }

// waitForFile polls until path exists, or fails the test after timeout.
func waitForFile(t *testing.T, path string, timeout time.Duration) {
	t.Helper()
	for deadline := time.Now().Add(timeout); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(path); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %s after %v", path, timeout)
		}
	}
}

func fileLines(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Fields(strings.TrimSpace(string(b)))
}

// TestJobPriorities (issue 13): with the node's one worker held by a job,
// low, then normal, then high jobs are queued; once the worker is free the
// node runs every high job, then every normal one, then every low one.
// The order is read from the app's own record of what ran, never from
// timings. Submitting with the Go client, Python's and the CLI's flag are
// checked in python/tests and below.
func TestJobPriorities(t *testing.T) {
	n := startNode(t, nodeOptions{workers: 1, app: ratePriApp()})
	cl, err := client.Connect(n.url, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir := t.TempDir()

	gate, err := cl.Submit(ctx, "gate", map[string]string{"dir": dir}, client.WithAwait())
	if err != nil {
		t.Fatal(err)
	}
	waitForFile(t, filepath.Join(dir, "gate-started"), time.Minute)

	const each = 4
	var jobs []*client.Job
	for _, p := range []string{"low", "normal", "high"} {
		for i := range each {
			id := fmt.Sprintf("%s-%d", p, i)
			j, err := cl.Submit(ctx, "record", map[string]string{"dir": dir, "id": id}, client.WithPriority(p), client.WithAwait())
			if err != nil {
				t.Fatalf("submit %s: %v", id, err)
			}
			jobs = append(jobs, j)
		}
	}
	// And one through the CLI's flag, last of all the high ones.
	if out, errOut, code := runSubmit(t, n.url, "", "job", "--priority", "high", "--id", "cli-high", "record",
		fmt.Sprintf(`{"dir":%q,"id":"high-cli"}`, dir)); code != 0 {
		t.Fatalf("submit job --priority high: exit %d: %s %s", code, out, errOut)
	}
	jobs = append(jobs, cl.Job("cli-high"))

	if err := os.WriteFile(filepath.Join(dir, "gate-open"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := gate.Result(ctx, nil); err != nil {
		t.Fatalf("gate: %v", err)
	}
	for _, j := range jobs {
		if err := j.Result(ctx, nil); err != nil {
			t.Fatalf("job %s: %v", j.ID, err)
		}
	}
	order := fileLines(t, filepath.Join(dir, "order"))
	if len(order) != 3*each+1 {
		t.Fatalf("ran %v, want %d jobs once each", order, 3*each+1)
	}
	rank := map[string]int{"high": 0, "normal": 1, "low": 2}
	levels := make([]int, len(order))
	for i, id := range order {
		levels[i] = rank[strings.SplitN(id, "-", 2)[0]]
	}
	if !slices.IsSorted(levels) {
		t.Fatalf("jobs ran in the order %v: want every high one, then every normal one, then every low one", order)
	}
	// Within a level, the order of submission.
	if order[0] != "high-0" || order[each] != "high-cli" || order[len(order)-1] != fmt.Sprintf("low-%d", each-1) {
		t.Fatalf("jobs ran in the order %v: want submission order within each level", order)
	}

	t.Run("bad priority", func(t *testing.T) {
		_, err := cl.Submit(ctx, "record", map[string]string{"dir": dir, "id": "x"}, client.WithPriority("urgent"))
		var ce *client.Error
		if !errors.As(err, &ce) || ce.Code != 400 || !ce.Local || !strings.Contains(ce.Message, `priority "urgent": want "high", "normal" or "low"`) {
			t.Fatalf("WithPriority(urgent): %v, want a local 400 naming the priorities", err)
		}
		_, errOut, code := runSubmit(t, n.url, "", "job", "--priority", "urgent", "record", `{}`)
		if code != 2 || !strings.Contains(errOut, `--priority: priority "urgent"`) {
			t.Fatalf("submit job --priority urgent: exit %d, %q", code, errOut)
		}
	})
}

// TestRateLimitAcrossNodes (issue 13): a function declared with
// rate_limit="20/s" served by two nodes of one pool starts, over a backlog
// of about five seconds of jobs, at 20 a second within 10%, with both
// nodes taking part; calls are held to the same limit.
func TestRateLimitAcrossNodes(t *testing.T) {
	srv := startNATSJetStream(t, "rate")
	url := srv.url()
	nodes := map[string]bool{}
	for i := range 2 {
		n := startNode(t, nodeOptions{name: clusterNodeName("rate", i+1), workers: 3, app: ratePriApp(), extra: []string{"--nats", url}})
		nodes[n.name] = true
	}
	cl, err := client.Connect(url, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const limit = 20.0
	fns, err := cl.Functions(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fns {
		if want := map[string]string{"tick": "20/s"}[f.Name]; f.RateLimit != want {
			t.Errorf("Functions: %s has rate limit %q, want %q", f.Name, f.RateLimit, want)
		}
	}

	t.Run("jobs", func(t *testing.T) {
		dir := t.TempDir()
		const count = 101 // 100 intervals: 5 s at the limit
		var jobs []*client.Job
		for i := range count {
			j, err := cl.Submit(ctx, "tick", map[string]string{"dir": dir, "i": strconv.Itoa(i)}, client.WithAwait())
			if err != nil {
				t.Fatal(err)
			}
			jobs = append(jobs, j)
		}
		for _, j := range jobs {
			if err := j.Result(ctx, nil); err != nil {
				t.Fatalf("job %s: %v", j.ID, err)
			}
		}
		rate, by := tickRate(t, dir, count)
		t.Logf("%d jobs started at %.2f/s (limit %.0f/s), per node %v", count, rate, limit, by)
		if math.Abs(rate-limit)/limit > 0.10 {
			t.Errorf("jobs started at %.2f/s, want %.0f/s within 10%%", rate, limit)
		}
		if len(by) != len(nodes) {
			t.Errorf("ticks ran on %v, want on both nodes %v", by, nodes)
		}
	})

	t.Run("calls", func(t *testing.T) {
		dir := t.TempDir()
		const count, inFlight = 41, 10 // 40 intervals: 2 s at the limit
		var wg sync.WaitGroup
		next := make(chan int)
		errs := make(chan error, count)
		for range inFlight {
			wg.Go(func() {
				for i := range next {
					if err := cl.Call(ctx, "tick", map[string]string{"dir": dir, "i": strconv.Itoa(i)}, nil); err != nil {
						errs <- err
					}
				}
			})
		}
		for i := range count {
			next <- i
		}
		close(next)
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		rate, by := tickRate(t, dir, count)
		t.Logf("%d calls, %d in flight, started at %.2f/s (limit %.0f/s), per node %v", count, inFlight, rate, limit, by)
		if math.Abs(rate-limit)/limit > 0.10 {
			t.Errorf("calls started at %.2f/s, want %.0f/s within 10%%", rate, limit)
		}
	})
}

// tickRate reads the start times tick wrote to dir: the rate over the
// window from the first start to the last, and the starts per node.
func tickRate(t *testing.T, dir string, want int) (float64, map[string]int) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "ticks"))
	if err != nil {
		t.Fatal(err)
	}
	var starts []float64
	by := map[string]int{}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		ts, worker, _ := strings.Cut(line, " ")
		f, err := strconv.ParseFloat(ts, 64)
		if err != nil {
			t.Fatalf("tick line %q: %v", line, err)
		}
		starts = append(starts, f)
		node, _, _ := strings.Cut(worker, "/")
		by[node]++
	}
	if len(starts) != want {
		t.Fatalf("%d ticks ran, want %d", len(starts), want)
	}
	sort.Float64s(starts)
	return float64(len(starts)-1) / (starts[len(starts)-1] - starts[0]), by
}

// TestRateLimitBadString: an app whose rate_limit does not parse never
// serves: the node exits with the app's error, which names the function.
func TestRateLimitBadString(t *testing.T) {
	app := filepath.Join(t.TempDir(), "badrate.py")
	src := "from pyfleet import App\napp = App()\n\n@app.function(rate_limit=\"fast\")\ndef hurry(payload):\n    return payload\n"
	if err := os.WriteFile(app, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	n := launchNode(t, nodeOptions{workers: 1, app: app})
	if code := n.wait(60 * time.Second); code == 0 {
		t.Fatalf("the node served an app with a bad rate limit:\n%s", n.log())
	}
	if want := `function 'hurry': bad rate_limit 'fast'`; !strings.Contains(n.log(), want) {
		t.Fatalf("the node's log does not say %q:\n%s", want, n.log())
	}
}
