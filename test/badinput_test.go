package test

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/pyfleet/pyfleet/lifecycle"
)

// TestBadStartExits2 runs poolnode with a bad setting each time: it exits 2
// at once with a message naming the problem.
func TestBadStartExits2(t *testing.T) {
	cases := []struct {
		name   string
		args   []string
		naming string
	}{
		{"node name with dots", []string{"--node", "a.b"}, "--node"},
		{"missing interpreter", []string{"--python", "/no/such/python3"}, "--python"},
		{"state dir not writable", []string{"--state-dir", "/dev/null/state"}, "--state-dir"},
		{"bad duration", []string{"--request-timeout", "soon"}, "request-timeout"},
		{"unknown flag", []string{"--wokers", "2"}, "wokers"},
		{"bad env value", nil, "PYFLEET_WORKERS"},
		{"memory limit in group mode", []string{"--containment", "group", "--worker-memory-limit", "64"}, "--worker-memory-limit needs cgroup containment"},
		{"pids limit in group mode", []string{"--containment", "group", "--worker-pids-limit", "64"}, "--worker-pids-limit needs cgroup containment"},
	}
	// Where cgroup containment works but the controller is missing (this
	// machine: cgroup v2 with hugetlb only), a limit is refused naming the
	// flag and where the controller is missing.
	if probe, err := lifecycle.NewCgroupContainment(lifecycle.Marker{Node: fmt.Sprintf("probe%d", os.Getpid()), Run: "limits"}); err == nil {
		l := probe.(lifecycle.Limiter)
		if l.CheckLimits(lifecycle.Limits{Memory: 64 << 20}) != nil {
			cases = append(cases, struct {
				name   string
				args   []string
				naming string
			}{"memory limit without the memory controller", []string{"--containment", "cgroup", "--worker-memory-limit", "64"}, "--worker-memory-limit: containment unavailable: the memory controller is not available at"})
		}
		if l.CheckLimits(lifecycle.Limits{Pids: 64}) != nil {
			cases = append(cases, struct {
				name   string
				args   []string
				naming string
			}{"pids limit without the pids controller", []string{"--containment", "cgroup", "--worker-pids-limit", "64"}, "--worker-pids-limit: containment unavailable: the pids controller"})
		}
		if err := probe.(interface{ Close() error }).Close(); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"--listen", "127.0.0.1:0", "--log-format", "json",
				"--app", repoRoot + "/python/examples/demo.py", "--python", python,
				"--state-dir", shortTempDir(t)}, tc.args...)
			cmd := exec.Command(poolnodeBin, args...)
			if tc.args == nil {
				cmd.Env = append(cmd.Environ(), "PYFLEET_WORKERS=many")
			}
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			done := make(chan error, 1)
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			go func() { done <- cmd.Wait() }()
			select {
			case <-done:
			case <-time.After(30 * time.Second):
				_ = cmd.Process.Kill()
				<-done
				t.Fatalf("still running after 30 s\n%s", stderr.String())
			}
			if code := cmd.ProcessState.ExitCode(); code != 2 {
				t.Errorf("exit %d, want 2\n%s", code, stderr.String())
			}
			if !strings.Contains(stderr.String(), tc.naming) {
				t.Errorf("stderr does not name %s:\n%s", tc.naming, stderr.String())
			}
		})
	}
}

// TestGarbageOnStdoutIsLogged: a worker whose app prints at import and in a
// function still serves; the lines reach the node's log tagged with the
// worker, and the replies are unaffected.
func TestGarbageOnStdoutIsLogged(t *testing.T) {
	dir := shortTempDir(t)
	app := dir + "/noisy.py"
	src := "from pyfleet import App\nprint('hello from import', flush=True)\napp = App()\n\n" +
		"@app.function\ndef noisy(payload):\n    print('PYFLEET-READY not really', flush=True)\n    print('\\x00\\x01 binary junk', flush=True)\n    return payload\n"
	if err := writeFile(app, src); err != nil {
		t.Fatal(err)
	}
	n := startNode(t, nodeOptions{app: app, workers: 1})
	nc := n.connect()
	msg, err := nc.Request("pyfleet.req.default.noisy", []byte(`{"a":1}`), 10*time.Second)
	if err != nil || string(msg.Data) != `{"a":1}` {
		t.Fatalf("noisy: %v %q", err, msgData(msg))
	}
	deadline := time.Now().Add(5 * time.Second)
	for !n.hasLog("binary junk", nil) && !strings.Contains(n.log(), "binary junk") {
		if time.Now().After(deadline) {
			t.Fatalf("the worker's stdout did not reach the log:\n%s", n.log())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !strings.Contains(n.log(), "hello from import") {
		t.Errorf("import-time output not logged")
	}
	if msg, err := nc.Request("pyfleet.req.default.noisy", []byte(`2`), 10*time.Second); err != nil || string(msg.Data) != "2" {
		t.Errorf("after garbage: %v %q", err, msgData(msg))
	}
}
