package test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pyfleet/pyfleet/client"
)

// oldNATSServerBinary is a nats-server from before message schedules
// (2.11), which `make tools` installs beside the current one.
func oldNATSServerBinary(t *testing.T) string {
	t.Helper()
	p := filepath.Join(repoRoot, ".tools", "nats-server-2.11", "nats-server")
	if st, err := os.Stat(p); err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
		t.Fatalf("no nats-server 2.11 binary at %s: run `make tools` (make test does)", p)
	}
	return p
}

// On a server older than 2.12 a node starts and runs jobs, warning that
// schedules are unavailable, and the client refuses delayed and recurring
// jobs with a clear error rather than storing schedules that never fire.
func TestSchedulesNeedServer212(t *testing.T) {
	ports := loopbackPorts(t, 2)
	s := &natsServer{t: t, name: "old", bin: oldNATSServerBinary(t), port: ports[0], httpPort: ports[1],
		scheme: "nats", storeDir: shortTempDir(t)}
	s.args = []string{"-n", "old", "-a", "127.0.0.1", "-p", strconv.Itoa(s.port), "-m", strconv.Itoa(s.httpPort), "-js", "-sd", s.storeDir}
	s.start()
	s.waitReady(30*time.Second, false)

	n := startNode(t, nodeOptions{app: jobsApp(), workers: 1, extra: []string{"--nats", s.url()}})
	c, err := client.Connect(s.url(), client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()

	job, err := c.Submit(ctx, "echo", "still works")
	if err != nil {
		t.Fatal(err)
	}
	var out string
	if err := job.Result(ctx, &out); err != nil || out != "still works" {
		t.Fatalf("a plain job on 2.11: %q, %v", out, err)
	}
	if !strings.HasPrefix(c.Conn().ConnectedServerVersion(), "2.11.") {
		t.Fatalf("server version %s", c.Conn().ConnectedServerVersion())
	}
	if !n.hasLog("the NATS server has no message schedules (needs nats-server >= 2.12.0): delayed and recurring jobs are refused; other jobs run",
		map[string]string{"stream": "PYFLEET_JOBS"}) {
		t.Errorf("no warning about schedules in the node's log")
	}

	_, errDelay := c.Submit(ctx, "echo", 1, client.WithDelay(time.Second))
	_, errCron := c.Schedule(ctx, "tick", "@every 1s", "echo", 1)
	for what, err := range map[string]error{"delay": errDelay, "schedule": errCron} {
		var ce *client.Error
		if !errors.As(err, &ce) || ce.Type != client.TypeNoSchedules || !errors.Is(err, client.ErrUnavailable) ||
			!strings.Contains(ce.Message, "need nats-server >= 2.12.0") || !strings.Contains(ce.Message, "is 2.11.") {
			t.Errorf("%s on 2.11: %v", what, err)
		}
	}
}
