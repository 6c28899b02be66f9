package test

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/protocol"
)

// plainPoolnode builds poolnode without -race for tests that measure the
// node's memory: the race detector's shadow memory would be most of it.
var plainPoolnode = sync.OnceValues(func() (string, error) {
	bin := filepath.Join(binDir, "poolnode-plain")
	build := exec.Command("go", "build", "-o", bin, "./cmd/poolnode")
	build.Dir = repoRoot
	if out, err := build.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build: %v\n%s", err, out)
	}
	return bin, nil
})

// procStatusBytes reads a "Vm…:  N kB" field of /proc/<pid>/status, in bytes.
func procStatusBytes(t *testing.T, pid int, field string) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatalf("status of pid %d: %v", pid, err)
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		name, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok || name != field {
			continue
		}
		f := strings.Fields(rest)
		kb, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil || len(f) != 2 || f[1] != "kB" {
			t.Fatalf("%s of pid %d: %q", field, pid, rest)
		}
		return kb << 10
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

const mb = 1 << 20

// memLeg is one flood thrown at the node, at the same time as the others.
type memLeg struct {
	name string
	// budget is how much the leg may add to the node's peak RSS, in bytes;
	// each leg says where its figure comes from.
	budget int64
	// run floods the node until stop is closed, then checks what it got.
	run func(t *testing.T, n *nodeProc, stop <-chan struct{})
}

// Memory-test limits: the node's own, shrunk so that they bite within a
// short test.
const (
	memWorkers     = 3         // two held by the endless jobs at first, one for the bodies
	memJobs        = 2         // jobs streaming without end
	memQueueBytes  = 4_000_000 // --queue-limit-bytes
	memClients     = 16        // clients sending large bodies, one request in flight each
	memBodyBytes   = 1_000_000 // under the embedded server's 1 MiB max payload, with room for headers
	memSessions    = 1000
	memSessionSize = 256 // the header length cap
	memFlood       = 8 * time.Second
)

// TestHostileMemory throws floods at a real node and checks that its RSS
// stays under a bound computed from its limits:
//
//	peak RSS (VmHWM) <= baseline + sessions' budget + each leg's budget + runtime slack
//
// The baseline is the RSS once the node serves and has run one call of each
// kind. The legs run at once; to add one (a job streaming without end, say),
// append a memLeg with its budget and the reasoning behind it.
func TestHostileMemory(t *testing.T) {
	bin, err := plainPoolnode()
	if err != nil {
		t.Fatal(err)
	}
	n := startNode(t, nodeOptions{app: hostilePoolApp(), workers: memWorkers, bin: bin,
		extra: []string{"--queue-limit-bytes", strconv.Itoa(memQueueBytes), "--log-level", "info"}})
	nc := n.connect()
	pid := n.cmd.Process.Pid

	// Warm up every path the floods take, so that buffers grown once (the
	// embedded server's, the client's, gRPC's) count in the baseline.
	body := bytes.Repeat([]byte("b"), memBodyBytes)
	if m, err := nc.Request(protocol.Subjects{}.Request("default", "slow_raw"), body, 10*time.Second); err != nil || protocol.ReplyError(m.Header, m.Data) != nil {
		t.Fatalf("warm-up: %v %v", err, m)
	}
	baseline := procStatusBytes(t, pid, "VmRSS")

	// 1,000 sessions of 256-byte keys first: they stay for an hour, so the
	// node holds every one of them while the floods run. Each is a map
	// entry with a copy of its key (not the request it came in): about
	// 0.5 KB, 0.5 MB in all; 4 MB leaves room for the calls' garbage.
	const sessionsBudget = 4 * mb
	openSessions(t, n, memSessions)

	legs := []memLeg{{
		// At most memClients bodies exist at once (each client waits for
		// its answer), each held at most 4 times in the node's process at
		// once: the embedded server's read buffer and its write buffer
		// towards the node's connection, the node's NATS message, the gRPC
		// frame to a worker. 16 x 1 MB x 4 = 64 MB live, and the Go GC
		// (GOGC=100) lets the heap reach twice the live data: 128 MB.
		// --queue-limit-bytes keeps 4 of the 16 bodies waiting, no more.
		name:   "16 clients, 1 MB bodies, slow function",
		budget: 2 * 4 * memClients * memBodyBytes,
		run:    floodBodies,
	}}
	// The endless jobs start first, so that they hold workers before the
	// bodies take every free slot (jobs are fetched only into idle ones).
	// Each collects its items up to the result limit (the 1 MiB max
	// payload) and ends 413; the items are held at most about 4 times (the
	// NATS message, the gRPC frame, the collected item, the joined result),
	// and twice that for the GC: 2 x 1 MiB x 4 x 2 = 16 MB.
	jobsLeg := memLeg{name: "jobs streaming without end", budget: memJobs * mb * 4 * 2, run: endlessJobs}
	// Goroutine stacks, gRPC and NATS buffers, the allocator's spans.
	const slack = 32 * mb

	bound := baseline + sessionsBudget + slack + jobsLeg.budget
	for _, l := range legs {
		bound += l.budget
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var peakSampled atomic.Int64
	sampling := make(chan struct{})
	go func() {
		defer close(sampling)
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			if rss := procStatusBytes(t, pid, "VmRSS"); rss > peakSampled.Load() {
				peakSampled.Store(rss)
			}
		}
	}()
	wg.Go(func() { jobsLeg.run(t, n, stop) })
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, busy, _ := nodeStats(t, nc, n.name); busy >= memJobs {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the endless jobs did not start within 10 s")
		}
	}
	for _, l := range legs {
		wg.Go(func() { l.run(t, n, stop) })
	}
	time.Sleep(memFlood)
	close(stop)
	wg.Wait()
	<-sampling

	peak := procStatusBytes(t, pid, "VmHWM")
	t.Logf("node RSS: baseline %d MB, peak sampled %d MB, peak (VmHWM) %d MB, bound %d MB",
		baseline/mb, peakSampled.Load()/mb, peak/mb, bound/mb)
	if peak > bound {
		t.Errorf("the node's peak RSS %d MB passed its bound %d MB (baseline %d MB)", peak/mb, bound/mb, baseline/mb)
	}
	assertStillServing(t, n, nc, memWorkers)
}

// openSessions opens count sessions with unique keys of memSessionSize
// bytes, 16 at a time, each with one echo call.
func openSessions(t *testing.T, n *nodeProc, count int) {
	t.Helper()
	nc := n.connect()
	keys := make(chan string, count)
	for i := range count {
		keys <- fmt.Sprintf("%s-%06d", strings.Repeat("s", memSessionSize-7), i)
	}
	close(keys)
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			for key := range keys {
				m := nats.NewMsg(protocol.Subjects{}.Request("default", "echo"))
				m.Header.Set(protocol.HeaderSession, key)
				m.Data = []byte(`"s"`)
				reply, err := nc.RequestMsg(m, 10*time.Second)
				if err != nil {
					t.Errorf("session call: %v", err)
					return
				}
				if e := protocol.ReplyError(reply.Header, reply.Data); e != nil {
					t.Errorf("session call: %d %s: %s", e.Code, e.Type, e.Message)
					return
				}
			}
		})
	}
	wg.Wait()
}

// floodBodies runs memClients clients, each on its own connection, sending
// memBodyBytes bodies to slow_raw (200 ms a call) one after another until
// stop: the free workers run what they can, the queue holds 4, and the rest are refused
// 503 naming the queue limit (each refused client pauses 10 ms, so as not
// to spin on a shared machine).
func floodBodies(t *testing.T, n *nodeProc, stop <-chan struct{}) {
	body := bytes.Repeat([]byte("f"), memBodyBytes)
	var ok, refused atomic.Int64
	var wg sync.WaitGroup
	for range memClients {
		nc := n.connect()
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				m, err := nc.Request(protocol.Subjects{}.Request("default", "slow_raw"), body, 10*time.Second)
				if err != nil {
					t.Errorf("1 MB call: %v", err)
					return
				}
				e := protocol.ReplyError(m.Header, m.Data)
				switch {
				case e == nil && string(m.Data) == strconv.Itoa(memBodyBytes):
					ok.Add(1)
				case e != nil && e.Code == 503 && strings.Contains(e.Message, "queue limit"):
					refused.Add(1)
					time.Sleep(10 * time.Millisecond)
				default:
					t.Errorf("1 MB call: %v %q", m.Header, m.Data)
					return
				}
			}
		})
	}
	wg.Wait()
	t.Logf("1 MB calls: %d answered, %d refused at the queue's bytes limit", ok.Load(), refused.Load())
	if ok.Load() == 0 || refused.Load() == 0 {
		t.Errorf("the flood should both be served and meet the queue's bytes limit")
	}
}

// endlessJobs submits memJobs jobs of trickle, a generator that never ends,
// and checks that each ends 413 at the result limit on its first delivery
// and that `submit job --wait` returns it. It does not need stop: the jobs
// end by themselves within the flood.
func endlessJobs(t *testing.T, n *nodeProc, _ <-chan struct{}) {
	var wg sync.WaitGroup
	for i := range memJobs {
		wg.Go(func() {
			_, errOut, code := runSubmitNoFatal(n.url, "job", "--wait", "--timeout", "60s",
				"--id", fmt.Sprintf("trickle-%d", i), "trickle", "{}")
			if code != 1 || !strings.Contains(errOut, "413 TooLarge: streamed result is over the limit of 1048576 bytes") {
				t.Errorf("submit job --wait trickle: exit %d, stderr %q; want 1 and the 413", code, errOut)
			}
		})
	}
	wg.Wait()
}
