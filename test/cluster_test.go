package test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pyfleet/pyfleet/bus"
	"github.com/pyfleet/pyfleet/lifecycle"
	"github.com/pyfleet/pyfleet/protocol"
)

// pyfleetStreams are the streams a node creates when they are missing, but
// replicated: a node creates them with one replica unless told otherwise
// (--stream-replicas) and leaves existing ones alone, so an operator who
// wants them to survive a server creates them first, as this does.
func pyfleetStreams(replicas int) []jetstream.StreamConfig {
	return bus.StreamConfigs("", replicas)
}

// clusterNodeName is a node name unique to this test process.
func clusterNodeName(kind string, i int) string {
	return fmt.Sprintf("%s%d-%d", kind, i, os.Getpid())
}

// TestClusterJobsNoneLostStress is issue 4's first test: a three-server
// JetStream cluster with the pyfleet streams replicated three times, three
// poolnodes on the URL list, N jobs; mid-run the server leading
// PYFLEET_JOBS is killed with SIGKILL, then one poolnode, then the server
// is restarted. Every job must end with exactly one stored result (ok, or
// the error of a dead letter in PYFLEET_DEAD), none lost. The test reports
// how many ran more than once; each of those must have had a run on the
// killed node, or a NATS failure (no result stored, no lookup) that its
// node logged for that job while its server was gone.
//
// N is 5,000; 20,000 with PYFLEET_STRESS=1 (make stress).
func TestClusterJobsNoneLostStress(t *testing.T) {
	t.Parallel() // busy, but pairs well with TestJobRetriesDeadLetterAndLease, which mostly waits
	n := 5000
	if os.Getenv("PYFLEET_STRESS") != "" {
		n = 20000
	}
	began := time.Now()
	cluster := startNATSCluster(t, 3)
	urls := cluster.urls()
	nc := connectNATS(t, urls)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	for _, cfg := range pyfleetStreams(3) {
		if _, err := js.CreateStream(ctx, cfg); err != nil {
			t.Fatalf("create stream %s R3: %v", cfg.Name, err)
		}
	}

	var nodes []*nodeProc
	for i := range 3 {
		nodes = append(nodes, startNode(t, nodeOptions{
			name: clusterNodeName("cj", i+1), workers: 2, app: jobsApp(),
			extra: []string{"--nats", urls},
		}))
	}
	t.Logf("cluster and 3 nodes up in %s", time.Since(began).Round(time.Millisecond))

	// The nodes kept the operator's streams, and the pool's consumer is
	// replicated like its stream.
	for _, cfg := range pyfleetStreams(3) {
		info := streamInfo(t, js, cfg.Name)
		if info.Config.Replicas != 3 || info.Cluster == nil || len(info.Cluster.Replicas) != 2 {
			t.Fatalf("stream %s: replicas %d, cluster %+v", cfg.Name, info.Config.Replicas, info.Cluster)
		}
	}
	cons, err := js.Consumer(ctx, "PYFLEET_JOBS", "pyfleet_default")
	if err != nil {
		t.Fatal(err)
	}
	if ci := cons.CachedInfo(); ci.Cluster == nil || len(ci.Cluster.Replicas) != 2 {
		t.Fatalf("consumer pyfleet_default is not replicated 3 times: %+v", ci.Cluster)
	}

	dir := t.TempDir()
	jobs := make([]jobSpec, n)
	for i := range jobs {
		id := fmt.Sprintf("j%05d", i)
		jobs[i] = jobSpec{id: id, subject: "pyfleet.job.default.work",
			data: []byte(fmt.Sprintf(`{"id":%q,"dir":%q,"ms":5}`, id, dir))}
	}
	start := time.Now()
	publishJobs(t, js, jobs)
	t.Logf("%d jobs published in %s", n, time.Since(start).Round(time.Millisecond))

	// Kills at a fifth and at two fifths of the results; the restart once
	// the node is gone.
	var killedServer *natsServer
	killedNode := nodes[1]
	waitStreamMsgs(t, js, "PYFLEET_RESULTS", uint64(n/5), 3*time.Minute, nil)
	{
		leader := streamInfo(t, js, "PYFLEET_JOBS").Cluster.Leader
		killedServer = cluster.server(leader)
		killedServer.kill()
		t.Logf("%s: SIGKILL nats-server %s (PYFLEET_JOBS leader)", time.Since(start).Round(time.Millisecond), leader)
	}
	waitStreamMsgs(t, js, "PYFLEET_RESULTS", uint64(2*n/5), 3*time.Minute, nil)
	if killedNode.cmd.Process.Signal(syscall.SIGKILL) != nil {
		t.Fatal("cannot kill the poolnode")
	}
	<-killedNode.done
	t.Logf("%s: SIGKILL poolnode %s", time.Since(start).Round(time.Millisecond), killedNode.name)
	killedNode.assertNoLeftovers(5 * time.Second)
	killedServer.restart()
	killedServer.waitReady(60*time.Second, true)
	t.Logf("%s: nats-server %s restarted and current", time.Since(start).Round(time.Millisecond), killedServer.name)

	last := time.Now()
	var lastHave uint64
	waitStreamMsgs(t, js, "PYFLEET_RESULTS", uint64(n), 4*time.Minute, func(have uint64) {
		if time.Since(last) > 10*time.Second && have != lastHave {
			t.Logf("%s: %d of %d results", time.Since(start).Round(time.Millisecond), have, n)
			last, lastHave = time.Now(), have
		}
	})
	took := time.Since(start)
	// The last acks follow the last stores.
	deadline := time.Now().Add(time.Minute)
	for {
		st := streamInfo(t, js, "PYFLEET_JOBS").State
		if st.Msgs == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("PYFLEET_JOBS not empty a minute after the last result: %+v", st)
		}
		time.Sleep(100 * time.Millisecond)
	}

	// Exactly one result per job: the results stream keeps one message
	// per job subject, so a second store of a job would show as a deleted
	// (replaced) message.
	if st := streamInfo(t, js, "PYFLEET_RESULTS").State; st.Msgs != uint64(n) || st.NumDeleted != 0 || st.LastSeq-st.FirstSeq+1 != uint64(n) {
		t.Errorf("PYFLEET_RESULTS state %+v: want %d messages, none replaced", st, n)
	}
	results := map[string]jetstream.Msg{}
	for _, m := range readStream(t, js, "PYFLEET_RESULTS", n) {
		id := strings.TrimPrefix(m.Subject(), "pyfleet.result.default.")
		if _, dup := results[id]; dup {
			t.Errorf("job %s has two stored results", id)
		}
		results[id] = m
	}
	dead := map[string]jetstream.Msg{}
	for _, m := range deadLetters(t, js) {
		dead[m.Headers().Get(protocol.HeaderJobID)] = m
	}
	runs := executions(t, dir)
	var ok, deadN, lost, twice, twiceKilled int
	var others []string
	for _, j := range jobs {
		m, have := results[j.id]
		switch {
		case !have:
			lost++
			if lost <= 10 {
				t.Errorf("job %s lost: no result", j.id)
			}
			continue
		case m.Headers().Get(protocol.HeaderStatus) == protocol.StatusOK:
			ok++
			var echoed struct{ ID string }
			if json.Unmarshal(m.Data(), &echoed) != nil || echoed.ID != j.id {
				t.Errorf("job %s result %s, want %s", j.id, m.Data(), j.data)
			}
			if runs[j.id] == nil {
				t.Errorf("job %s has an ok result but no recorded run", j.id)
			}
		default:
			deadN++
			d, have := dead[j.id]
			if !have {
				t.Errorf("job %s stored an error (%s) but is not in PYFLEET_DEAD", j.id, m.Data())
			} else if !strings.Contains(string(d.Data()), `"error"`) {
				t.Errorf("dead letter of %s has no error: %s", j.id, d.Data())
			}
		}
		if e := runs[j.id]; e != nil && e.count > 1 {
			twice++
			onKilled := false
			for _, nd := range e.nodes {
				onKilled = onKilled || nd == killedNode.name
			}
			if onKilled {
				twiceKilled++
			} else {
				others = append(others, fmt.Sprintf("%s on %v", j.id, e.nodes))
			}
		}
	}
	t.Logf("DUPLICATES %d jobs: %d ok, %d dead-lettered, %d lost; %d ran more than once (%d with a run on the killed node %s, %d others); all done %s after the first publish",
		n, ok, deadN, lost, twice, twiceKilled, killedNode.name, len(others), took.Round(time.Millisecond))
	// A job may run twice where its node died mid-run, or where its node
	// lost its NATS server mid-job (its result could not be stored, or its
	// stored result not looked up); then the node said so in its log.
	sort.Strings(others)
	for _, o := range others {
		id, _, _ := strings.Cut(o, " ")
		var why []string
		for _, nd := range nodes {
			for _, line := range strings.Split(nd.log(), "\n") {
				if strings.Contains(line, `"job":"`+id+`"`) && (strings.Contains(line, `"level":"warn"`) || strings.Contains(line, `"level":"error"`)) {
					why = append(why, nd.name+": "+line)
				}
			}
		}
		if len(why) == 0 {
			t.Errorf("job %s ran more than once (%s), neither on the killed node nor after a NATS failure its node logged", id, o)
			continue
		}
		t.Logf("ran twice: %s, after: %s", o, strings.Join(why[:min(3, len(why))], " | "))
	}
	if lost > 0 {
		t.Errorf("%d of %d jobs lost", lost, n)
	}
	if len(dead) != deadN {
		t.Errorf("%d dead letters for %d jobs whose stored result is an error", len(dead), deadN)
	}
	// The survivors still serve, on every server.
	for _, s := range cluster.servers {
		out, errOut, code := runSubmit(t, s.url(), "", "job", "--wait", "--timeout", "60s", "work", `{"id":"after"}`)
		if code != 0 || strings.TrimSpace(out) != `{"id":"after"}` {
			t.Errorf("job via %s after the kills: exit %d, stdout %q, stderr %q", s.name, code, out, errOut)
		}
	}
}

// TestClusterRequestsSpreadAndFailOver is issue 4's third test: three nodes
// on one real nats-server (one server, because NATS prefers queue members
// on the publisher's own server in a cluster); 3,000 calls with 16 in
// flight spread over all three; then, with calls in flight on every node,
// one node is killed with SIGKILL: its in-flight calls must fail fast with
// a clear error, not hang to their deadline, and later calls succeed on the
// two others.
func TestClusterRequestsSpreadAndFailOver(t *testing.T) {
	srv := startNATSJetStream(t, "rr")
	url := srv.url()
	var nodes []*nodeProc
	for i := range 3 {
		nodes = append(nodes, startNode(t, nodeOptions{
			name: clusterNodeName("rr", i+1), workers: 2, app: jobsApp(), extra: []string{"--nats", url},
		}))
	}
	nc := connectNATS(t, url)

	t.Run("3000 calls spread over three nodes", func(t *testing.T) {
		const calls, inFlight = 3000, 16
		counts := map[string]int{}
		var mu sync.Mutex
		var wg sync.WaitGroup
		next := make(chan int)
		errs := make(chan error, calls)
		for range inFlight {
			wg.Go(func() {
				for i := range next {
					m, err := nc.Request("pyfleet.req.default.echo", []byte(fmt.Sprint(i)), 30*time.Second)
					if err == nil && (m.Header.Get(protocol.HeaderStatus) != protocol.StatusOK || string(m.Data) != fmt.Sprint(i)) {
						err = fmt.Errorf("call %d: %v %s", i, m.Header, m.Data)
					}
					if err != nil {
						errs <- err
						continue
					}
					mu.Lock()
					counts[m.Header.Get(protocol.HeaderNode)]++
					mu.Unlock()
				}
			})
		}
		start := time.Now()
		for i := range calls {
			next <- i
		}
		close(next)
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		t.Logf("%d calls, %d in flight, in %s (%.0f/s): per node %v", calls, inFlight, time.Since(start).Round(time.Millisecond),
			calls/time.Since(start).Seconds(), counts)
		for _, n := range nodes {
			// A fair share is a third; NATS picks a queue member at
			// random, so anything under a quarter is not chance.
			if counts[n.name] < calls/4 {
				t.Errorf("node %s answered %d of %d calls, want at least %d", n.name, counts[n.name], calls, calls/4)
			}
		}
	})

	t.Run("kill -9 of a node under load", func(t *testing.T) {
		dir := t.TempDir()
		const inFlight = 16
		const deadline = 15 * time.Second
		type outcome struct {
			i        int
			out, err string
			code     int
			ended    time.Time
		}
		results := make(chan outcome, inFlight)
		for i := range inFlight {
			go func() {
				body := fmt.Sprintf(`{"key":"c%d","seconds":2,"dir":%q}`, i, dir)
				out, errOut, code := runSubmitNoFatal(url, "call", "--timeout", deadline.String(), "long", body)
				results <- outcome{i: i, out: out, err: errOut, code: code, ended: time.Now()}
			}()
		}
		// Once most workers run calls of ours, kill the node running
		// the most of them.
		var victim *nodeProc
		waitUntil(t, 30*time.Second, "4 calls running", func() bool {
			started := 0
			for _, n := range nodes {
				on := len(startedOn(t, dir, n.name))
				started += on
				if victim == nil || on > len(startedOn(t, dir, victim.name)) {
					victim = n
				}
			}
			return started >= 4
		})
		if err := victim.cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		killed := time.Now()
		<-victim.done
		onVictim := startedOn(t, dir, victim.name)
		t.Logf("killed %s with calls %v running on it", victim.name, onVictim)

		t.Run("later calls succeed on the others", func(t *testing.T) {
			for i := range 30 {
				m, err := nc.Request("pyfleet.req.default.echo", []byte(fmt.Sprint(i)), 10*time.Second)
				if err != nil {
					t.Fatalf("call %d after the kill: %v", i, err)
				}
				if m.Header.Get(protocol.HeaderStatus) != protocol.StatusOK || m.Header.Get(protocol.HeaderNode) == victim.name {
					t.Fatalf("call %d after the kill: %v %s", i, m.Header, m.Data)
				}
			}
		})

		var failed []outcome
		for range inFlight {
			o := <-results
			if o.code != 0 {
				failed = append(failed, o)
			} else if !strings.Contains(o.out, `"slept": 2`) && !strings.Contains(o.out, `"slept":2`) {
				t.Errorf("call c%d: stdout %q", o.i, o.out)
			}
		}
		if len(failed) < len(onVictim) {
			t.Errorf("%d calls failed, but %d were running on the killed node", len(failed), len(onVictim))
		}
		sort.Slice(failed, func(a, b int) bool { return failed[a].i < failed[b].i })
		for _, o := range failed {
			after := o.ended.Sub(killed)
			t.Logf("call c%d failed %s after the kill (deadline %s): exit %d: %s", o.i, after.Round(time.Millisecond), deadline, o.code, strings.TrimSpace(o.err))
			if strings.TrimSpace(o.err) == "" {
				t.Errorf("call c%d failed without a message", o.i)
			}
		}
		t.Run("in-flight calls fail fast", func(t *testing.T) {
			// Well before the deadline, not at it. A SIGKILLed node
			// answers nothing and core NATS tells the requester nothing:
			// submit asks for heartbeats (Pyfleet-Heartbeat) and gives
			// up on a node that falls silent.
			var slow []string
			for _, o := range failed {
				if after := o.ended.Sub(killed); after > deadline/3 {
					slow = append(slow, fmt.Sprintf("c%d after %s", o.i, after.Round(time.Millisecond)))
				}
			}
			if len(slow) > 0 {
				t.Errorf("calls in flight on the killed node did not fail fast: %d of %d failed only at their %s deadline (%v) instead of "+
					"within %s of the kill with an error naming the lost node", len(slow), len(failed), deadline, slow, deadline/3)
			}
		})
	})
}

// startedOn lists the `long` calls (by key) that started on node: each
// writes <dir>/long-<key> with its worker's node_run_worker tag.
func startedOn(t *testing.T, dir, node string) []string {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(dir, "long-*"))
	var keys []string
	for _, f := range files {
		for _, line := range readLines(t, f) {
			if strings.HasPrefix(line, node+"_") {
				keys = append(keys, strings.TrimPrefix(filepath.Base(f), "long-"))
			}
		}
	}
	sort.Strings(keys)
	return keys
}

func waitUntil(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("no %s after %s", what, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestSessionKeepsItsWorkerThenGets410 is issue 4's fourth test: a session
// keeps its worker across 100 calls through `submit call --session S --node
// N --headers`; once that worker is killed, the next call of the session
// gets 410 (submit exits 1 and prints `410 SessionLost: ...`), never a
// silent move to another worker.
func TestSessionKeepsItsWorkerThenGets410(t *testing.T) {
	srv := startNATSJetStream(t, "sess")
	url := srv.url()
	var nodes []*nodeProc
	for i := range 2 {
		nodes = append(nodes, startNode(t, nodeOptions{
			name: clusterNodeName("ss", i+1), workers: 3, app: jobsApp(), extra: []string{"--nats", url},
		}))
	}
	nc := connectNATS(t, url)
	ev := watchEvents(t, nc, "default")

	type who struct {
		PID    int    `json:"pid"`
		Worker string `json:"worker"`
	}
	call := func(args ...string) (who, nats.Header, string, int) {
		t.Helper()
		out, errOut, code := runSubmitNoFatal(url, append([]string{"call", "--session", "S1", "--headers"}, args...)...)
		var w who
		if code == 0 {
			if err := json.Unmarshal(hostPIDs(t, []byte(out)), &w); err != nil {
				t.Fatalf("submit call %v: stdout %q: %v", args, out, err)
			}
		}
		return w, parseHeaderLines(errOut), errOut, code
	}
	first, h, errOut, code := call("whoami")
	if code != 0 {
		t.Fatalf("first call: exit %d: %s", code, errOut)
	}
	node, worker := h.Get(protocol.HeaderNode), h.Get(protocol.HeaderWorker)
	if node == "" || worker == "" || first.PID == 0 {
		t.Fatalf("first call: headers %v, body %+v", h, first)
	}
	var holder *nodeProc
	for _, n := range nodes {
		if n.name == node {
			holder = n
		}
	}
	if holder == nil {
		t.Fatalf("reply from unknown node %q", node)
	}
	for i := range 100 {
		w, h, errOut, code := call("--node", node, "whoami")
		if code != 0 {
			t.Fatalf("call %d: exit %d: %s", i, code, errOut)
		}
		if h.Get(protocol.HeaderWorker) != worker || h.Get(protocol.HeaderNode) != node || w.PID != first.PID {
			t.Fatalf("call %d of session S1 reached %s/%s pid %d, want %s/%s pid %d",
				i, h.Get(protocol.HeaderNode), h.Get(protocol.HeaderWorker), w.PID, node, worker, first.PID)
		}
	}

	// The pid is one of the holder's workers, and only that is killed.
	isHolders := false
	for _, id := range holder.processes() {
		isHolders = isHolders || id.PID == first.PID
	}
	if !isHolders {
		t.Fatalf("pid %d is not a worker of node %s: %v", first.PID, node, holder.processes())
	}
	supervised := supervisedOf(t, first.PID)
	if err := syscall.Kill(first.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	ev.waitFor(20*time.Second, func(e lifecycle.Event) bool {
		return e.Kind == lifecycle.KindCrashed && e.Node == node && e.PID == supervised
	})
	_, _, errOut, code = call("--node", node, "whoami")
	if code != 1 || !strings.Contains(errOut, "410 SessionLost: ") {
		t.Fatalf("call after the worker died: exit %d, stderr %q; want exit 1 and 410 SessionLost", code, errOut)
	}
	// Also once the worker's slot has a replacement: still 410.
	ev.waitFor(30*time.Second, func(e lifecycle.Event) bool {
		return e.Kind == lifecycle.KindRestarted && e.Node == node && e.Worker == worker
	})
	_, _, errOut, code = call("--node", node, "whoami")
	if code != 1 || !strings.Contains(errOut, "410 SessionLost: ") {
		t.Errorf("call after the replacement is ready: exit %d, stderr %q; want 410 SessionLost", code, errOut)
	}
	// A new session is served.
	if out, errOut, code := runSubmit(t, url, "", "call", "--session", "S2", "whoami"); code != 0 {
		t.Errorf("new session: exit %d, %q %q", code, out, errOut)
	}
}

// parseHeaderLines reads `Key: value` lines (submit --headers on stderr).
func parseHeaderLines(s string) nats.Header {
	h := nats.Header{}
	for _, line := range strings.Split(s, "\n") {
		k, v, ok := strings.Cut(line, ": ")
		if ok && !strings.Contains(k, " ") {
			h.Add(k, v)
		}
	}
	return h
}
