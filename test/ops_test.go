package test

import (
	"encoding/json"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// freePort finds a loopback port nobody listens on right now.
func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// TestMetricsMatchRequests scrapes /metrics after a known mix of calls: the
// counters equal what was sent, and /healthz says ready.
func TestMetricsMatchRequests(t *testing.T) {
	addr := freePort(t)
	n := startNode(t, nodeOptions{workers: 2, extra: []string{"--metrics", addr}})
	nc := n.connect()
	for i := range 20 {
		if _, err := nc.Request("pyfleet.req.default.echo", []byte(strconv.Itoa(i)), 10*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	for range 3 {
		if _, err := nc.Request("pyfleet.req.default.fail", []byte(`{}`), 10*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	for range 2 {
		if _, err := nc.Request("pyfleet.req.default.nope", []byte(`{}`), 10*time.Second); err != nil {
			t.Fatal(err)
		}
	}

	resp, err := http.Get("http://" + addr + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("/healthz: %d", resp.StatusCode)
	}

	resp, err = http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("/metrics does not parse: %v", err)
	}
	requests := families["pyfleet_requests_total"]
	if requests == nil {
		t.Fatalf("no pyfleet_requests_total among %d families", len(families))
	}
	want := map[[2]string]float64{{"echo", "200"}: 20, {"fail", "500"}: 3, {"_unknown", "404"}: 2}
	for _, m := range requests.Metric {
		key := [2]string{label(m, "function"), label(m, "code")}
		if w, ok := want[key]; ok {
			if got := m.GetCounter().GetValue(); got != w {
				t.Errorf("requests %v = %v, want %v", key, got, w)
			}
			delete(want, key)
		}
	}
	if len(want) > 0 {
		t.Errorf("series missing: %v", want)
	}
	if w := families["pyfleet_workers"]; w == nil || w.Metric[0].GetGauge().GetValue() != 2 {
		t.Errorf("pyfleet_workers: %v", w)
	}
	if s := families["pyfleet_worker_spawns_total"]; s == nil || s.Metric[0].GetCounter().GetValue() != 2 {
		t.Errorf("pyfleet_worker_spawns_total: %v", s)
	}
}

func label(m *dto.Metric, name string) string {
	for _, l := range m.Label {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

// TestSubmitNodesListsTwoNodes runs two nodes of one pool on one NATS server
// and lists them with submit nodes.
func TestSubmitNodesListsTwoNodes(t *testing.T) {
	a := startNode(t, nodeOptions{workers: 2})
	b := startNode(t, nodeOptions{workers: 3, extra: []string{"--nats", a.url}})
	out, errOut, code := runSubmit(t, a.url, "", "nodes", "--json")
	if code != 0 {
		t.Fatalf("submit nodes: exit %d: %s", code, errOut)
	}
	var nodes []struct {
		Node    string `json:"node"`
		Pool    string `json:"pool"`
		Workers *int   `json:"workers"`
	}
	if err := json.Unmarshal([]byte(out), &nodes); err != nil {
		t.Fatalf("submit nodes --json: %v\n%s", err, out)
	}
	got := map[string]int{}
	for _, nd := range nodes {
		if nd.Workers != nil && nd.Pool == "default" {
			got[nd.Node] = *nd.Workers
		}
	}
	if got[a.name] != 2 || got[b.name] != 3 || len(got) != 2 {
		t.Errorf("nodes %v, want %s:2 and %s:3\n%s", got, a.name, b.name, out)
	}
	table, _, code := runSubmit(t, a.url, "", "nodes")
	if code != 0 || !strings.Contains(table, a.name) || !strings.Contains(table, b.name) {
		t.Errorf("submit nodes table (exit %d):\n%s", code, table)
	}
}

// TestSigtermUnderLoadFinishesAcceptedWork stops a node while calls are in
// flight: every call is either answered by its function or refused with 503
// (so the client can go elsewhere); none is dropped or cut off; exit 0.
func TestSigtermUnderLoadFinishesAcceptedWork(t *testing.T) {
	n := startNode(t, nodeOptions{workers: 2})
	nc := n.connect()
	const callers = 8
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		ok      int
		refused int
		bad     []string
	)
	stop := make(chan struct{})
	started := make(chan struct{}, callers)
	for range callers {
		wg.Go(func() {
			first := true
			for {
				select {
				case <-stop:
					return
				default:
				}
				msg, err := nc.Request("pyfleet.req.default.sleep", []byte(`150`), 20*time.Second)
				if first {
					started <- struct{}{}
					first = false
				}
				mu.Lock()
				switch {
				case err != nil:
					if err == nats.ErrNoResponders {
						refused++ // the node is gone: nothing was accepted
						mu.Unlock()
						return
					}
					bad = append(bad, err.Error())
				case msg.Header.Get("Pyfleet-Status") == "ok":
					ok++
				case msg.Header.Get("Nats-Service-Error-Code") == "503":
					refused++
				default:
					bad = append(bad, msg.Header.Get("Nats-Service-Error-Code")+" "+string(msg.Data))
				}
				mu.Unlock()
			}
		})
	}
	for range callers {
		<-started
	}
	n.signal(syscall.SIGTERM)
	code := n.wait(30 * time.Second)
	close(stop)
	wg.Wait()
	if code != 0 {
		t.Errorf("exit code %d", code)
	}
	if len(bad) > 0 {
		t.Errorf("%d calls failed other than by a 503: %v", len(bad), bad)
	}
	if ok < callers {
		t.Errorf("only %d calls answered ok", ok)
	}
	t.Logf("%d answered, %d refused while draining", ok, refused)
}

// TestHealthzNotReadyWhileDraining checks that /healthz turns 503 once the
// node drains, so a load balancer stops sending work.
func TestHealthzNotReadyWhileDraining(t *testing.T) {
	addr := freePort(t)
	n := startNode(t, nodeOptions{workers: 1, extra: []string{"--metrics", addr, "--shutdown-grace", "5s"}})
	nc := n.connect()
	go func() { _, _ = nc.Request("pyfleet.req.default.sleep", []byte(`2000`), 10*time.Second) }()
	time.Sleep(200 * time.Millisecond) // let the call start
	n.signal(syscall.SIGTERM)
	deadline := time.Now().Add(2 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/healthz")
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusServiceUnavailable && strings.Contains(string(body), "draining") {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("/healthz never said draining")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if code := n.wait(30 * time.Second); code != 0 {
		t.Errorf("exit code %d", code)
	}
}
