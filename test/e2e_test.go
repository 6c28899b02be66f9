package test

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/lifecycle"
)

// TestRequestPath drives the demo app through a real poolnode, with real
// Python workers, from a NATS client and from the submit binary.
func TestRequestPath(t *testing.T) {
	n := startNode(t, nodeOptions{workers: 2})
	nc := n.connect()

	t.Run("echo over NATS", func(t *testing.T) {
		msg, err := nc.Request("pyfleet.req.default.echo", []byte(`{"hi":1}`), 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if string(msg.Data) != `{"hi":1}` {
			t.Errorf("body %q", msg.Data)
		}
		if got := msg.Header.Get("Pyfleet-Status"); got != "ok" {
			t.Errorf("Pyfleet-Status %q", got)
		}
		if got := msg.Header.Get("Pyfleet-Node"); got != n.name {
			t.Errorf("Pyfleet-Node %q, want %q", got, n.name)
		}
		if got := msg.Header.Get("Pyfleet-Worker"); !strings.HasPrefix(got, "w") {
			t.Errorf("Pyfleet-Worker %q", got)
		}
	})

	t.Run("submit call echo", func(t *testing.T) {
		out, errOut, code := runSubmit(t, n.url, "", "call", "echo", `{"hi":1}`)
		if code != 0 || out != "{\"hi\":1}\n" {
			t.Errorf("exit %d, stdout %q, stderr %q", code, out, errOut)
		}
	})

	t.Run("submit call streams count", func(t *testing.T) {
		out, errOut, code := runSubmit(t, n.url, "", "call", "count", `{"n":3}`)
		if code != 0 || out != "0\n1\n2\n" {
			t.Errorf("exit %d, stdout %q, stderr %q", code, out, errOut)
		}
	})

	t.Run("submit call fail", func(t *testing.T) {
		out, errOut, code := runSubmit(t, n.url, "", "call", "fail", `{}`)
		if code != 1 {
			t.Errorf("exit %d, want 1; stdout %q", code, out)
		}
		if !strings.Contains(errOut, "500 RuntimeError: this function always fails") {
			t.Errorf("stderr %q does not name the exception", errOut)
		}
	})

	t.Run("async and raw functions", func(t *testing.T) {
		msg, err := nc.Request("pyfleet.req.default.sum", []byte(`[1,2,3]`), 10*time.Second)
		if err != nil || string(msg.Data) != "6" {
			t.Errorf("sum: %v %q", err, msgData(msg))
		}
		msg, err = nc.Request("pyfleet.req.default.reverse", []byte("not json"), 10*time.Second)
		if err != nil || string(msg.Data) != "nosj ton" {
			t.Errorf("reverse: %v %q", err, msgData(msg))
		}
	})

	errorCases := []struct {
		name, subject, body string
		code                string
		errType             string
	}{
		{"unknown function", "pyfleet.req.default.nope", `{}`, "404", "NotFound"},
		{"malformed JSON", "pyfleet.req.default.echo", `{"hi":`, "400", "BadRequest"},
	}
	for _, tc := range errorCases {
		t.Run(tc.name, func(t *testing.T) {
			msg, err := nc.Request(tc.subject, []byte(tc.body), 10*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if got := msg.Header.Get("Nats-Service-Error-Code"); got != tc.code {
				t.Errorf("code %q, want %s; body %s", got, tc.code, msg.Data)
			}
			if msg.Header.Get("Pyfleet-Status") != "error" || msg.Header.Get("Nats-Service-Error") == "" {
				t.Errorf("headers %v", msg.Header)
			}
			var body struct {
				Error struct {
					Code    int    `json:"code"`
					Type    string `json:"type"`
					Message string `json:"message"`
				} `json:"error"`
			}
			if err := json.Unmarshal(msg.Data, &body); err != nil {
				t.Fatalf("error body %q: %v", msg.Data, err)
			}
			if body.Error.Type != tc.errType || body.Error.Message == "" {
				t.Errorf("error body %+v", body.Error)
			}
		})
	}

	t.Run("micro service discovery", func(t *testing.T) {
		sub, err := nc.SubscribeSync(nats.NewInbox())
		if err != nil {
			t.Fatal(err)
		}
		defer sub.Unsubscribe()
		if err := nc.PublishRequest("$SRV.INFO.pyfleet", sub.Subject, nil); err != nil {
			t.Fatal(err)
		}
		msg, err := sub.NextMsg(5 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		var info struct {
			Name      string `json:"name"`
			Endpoints []struct {
				Subject string `json:"subject"`
			} `json:"endpoints"`
		}
		if err := json.Unmarshal(msg.Data, &info); err != nil {
			t.Fatal(err)
		}
		subjects := map[string]bool{}
		for _, e := range info.Endpoints {
			subjects[e.Subject] = true
		}
		if info.Name != "pyfleet" || !subjects["pyfleet.req.default.echo"] || !subjects["pyfleet.req.default.count"] {
			t.Errorf("info %+v", info)
		}
	})

	t.Run("nats CLI", func(t *testing.T) {
		natsCLI := natsCLIPath(t)
		out, err := exec.Command(natsCLI, "--server", n.url, "req", "pyfleet.req.default.echo", `{"hi":1}`).CombinedOutput()
		if err != nil {
			t.Fatalf("nats req: %v\n%s", err, out)
		}
		if !strings.Contains(string(out), `{"hi":1}`) || !strings.Contains(string(out), "Pyfleet-Status: ok") {
			t.Errorf("nats req output:\n%s", out)
		}
		out, err = exec.Command(natsCLI, "--server", n.url, "micro", "ls").CombinedOutput()
		if err != nil || !strings.Contains(string(out), "pyfleet") {
			t.Errorf("nats micro ls: %v\n%s", err, out)
		}
	})
}

func msgData(m *nats.Msg) string {
	if m == nil {
		return ""
	}
	return string(m.Data)
}

// natsCLIPath finds the real nats CLI that `make tools` installs.
func natsCLIPath(t *testing.T) string {
	t.Helper()
	p := filepath.Join(repoRoot, ".tools", "bin", "nats")
	if _, err := os.Stat(p); err == nil {
		return p
	}
	if p, err := exec.LookPath("nats"); err == nil {
		return p
	}
	t.Fatal("no nats CLI: run `make tools` (make test does)")
	return ""
}

// TestWorkerCrashIsReplaced kills a worker with SIGKILL: the node reports
// crashed, then restarted, and the replacement serves.
func TestWorkerCrashIsReplaced(t *testing.T) {
	n := startNode(t, nodeOptions{workers: 1})
	nc := n.connect()
	ev := watchEvents(t, nc, "default")

	msg, err := nc.Request("pyfleet.req.default.echo", []byte(`1`), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	worker := msg.Header.Get("Pyfleet-Worker")
	// The Python process is killed; events name the process the node
	// supervises, which is the worker's init where it has one.
	pys, supervised := n.pythonPIDs(t), n.workerPIDs()
	if len(pys) != 1 || len(supervised) != 1 {
		t.Fatalf("want 1 worker process, have %v (supervised %v)", pys, supervised)
	}
	if err := syscall.Kill(pys[0], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	crashed := ev.waitFor(10*time.Second, kind(lifecycle.KindCrashed))
	if crashed.PID != supervised[0] || crashed.Signal != "SIGKILL" || crashed.Worker != worker {
		t.Errorf("crashed event %+v", crashed)
	}
	restarted := ev.waitFor(30*time.Second, kind(lifecycle.KindRestarted))
	if restarted.Worker != worker || restarted.PID == supervised[0] || restarted.PID == 0 {
		t.Errorf("restarted event %+v", restarted)
	}
	msg, err = nc.Request("pyfleet.req.default.echo", []byte(`2`), 10*time.Second)
	if err != nil || string(msg.Data) != "2" {
		t.Fatalf("after restart: %v %q", err, msgData(msg))
	}
}

// TestCleanStop sends SIGINT: the node drains, publishes node_stopping and
// node_stopped, exits 0, and leaves no process, including a child that a
// worker started.
func TestCleanStop(t *testing.T) {
	n := startNode(t, nodeOptions{workers: 2})
	nc := n.connect()
	ev := watchEvents(t, nc, "default")
	if _, err := nc.Request("pyfleet.req.default.spawn", []byte(`{"seconds":600}`), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if got := len(n.userProcesses()); got != 3 {
		t.Fatalf("want 2 workers and 1 child, have %d processes", got)
	}
	n.signal(syscall.SIGINT)
	if code := n.wait(30 * time.Second); code != 0 {
		t.Fatalf("exit code %d\n%s", code, n.log())
	}
	n.assertNoLeftovers(time.Second)
	ev.waitFor(5*time.Second, kind(lifecycle.KindNodeStopping))
	ev.waitFor(5*time.Second, kind(lifecycle.KindNodeStopped))
	if got := ev.count(func(e lifecycle.Event) bool {
		return e.Kind == lifecycle.KindTerminated && e.Reason == lifecycle.ReasonStop
	}); got != 2 {
		t.Errorf("%d terminated(stop) events, want 2: %v", got, ev.kinds())
	}
}

// TestBadAppExits2 starts a node whose app fails to import: it says why and
// exits 2 at once, with no crash loop.
func TestBadAppExits2(t *testing.T) {
	dir := shortTempDir(t)
	app := filepath.Join(dir, "broken.py")
	if err := os.WriteFile(app, []byte("import no_such_module_here\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	n := launchNode(t, nodeOptions{app: app, workers: 2})
	if code := n.wait(60 * time.Second); code != 2 {
		t.Fatalf("exit code %d, want 2", code)
	}
	if !strings.Contains(n.log(), "no_such_module_here") {
		t.Errorf("log does not name the missing module:\n%s", n.log())
	}
}

// TestOtherRuntimeVersionExits2 starts a node whose interpreter's pyfleet
// speaks another worker protocol (the app makes its READY line say v1, as an
// older release's runtime would): the node names both versions and the fix,
// exits 2 at once, with no crash loop, and leaves nothing of the run.
func TestOtherRuntimeVersionExits2(t *testing.T) {
	for _, preload := range []bool{false, true} {
		t.Run(map[bool]string{false: "spawned", true: "preloaded"}[preload], func(t *testing.T) {
			dir := shortTempDir(t)
			app := filepath.Join(dir, "oldruntime.py")
			src := "from pyfleet import App, process\nprocess.PROTOCOL_VERSION = 1\napp = App()\n\n@app.function\ndef echo(payload):\n    return payload\n"
			if err := os.WriteFile(app, []byte(src), 0o644); err != nil {
				t.Fatal(err)
			}
			n := launchNode(t, nodeOptions{app: app, workers: 2, preload: preload})
			if code := n.wait(60 * time.Second); code != 2 {
				t.Fatalf("exit code %d, want 2", code)
			}
			if log := n.log(); !strings.Contains(log, "worker protocol v1, this node v2") || !strings.Contains(log, "--python") {
				t.Errorf("log does not name the versions and the interpreter:\n%s", log)
			}
			// launchNode's cleanup fails the test if any process of the run is left.
		})
	}
}
