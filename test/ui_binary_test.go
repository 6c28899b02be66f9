package test

import (
	"bufio"
	"encoding/json"
	"io"
	"net/http"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestSubmitUIBinary runs `bin/submit ui` as a user would (TestUIBrowser
// drives the ui package in process): it prints where the page is, serves
// the page and the fleet's state with the node in it, refuses actions
// without --actions, and exits 0 on SIGINT.
func TestSubmitUIBinary(t *testing.T) {
	n := startNode(t, nodeOptions{})
	cmd := exec.Command(submitBin, "ui", "--nats", n.url, "--listen", "127.0.0.1:0", "--poll", "200ms")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})

	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("submit ui printed no address: %v; stderr %q", err, stderr.String())
	}
	// "submit ui: http://127.0.0.1:PORT/ (read-only)"
	base, ok := strings.CutPrefix(strings.TrimSpace(line), "submit ui: ")
	base, mode, _ := strings.Cut(base, " ")
	if !ok || !strings.HasPrefix(base, "http://127.0.0.1:") || mode != "(read-only)" {
		t.Fatalf("submit ui's first line %q: want the loopback address, read-only", line)
	}
	get := func(path string) (int, string) {
		resp, err := http.Get(strings.TrimSuffix(base, "/") + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, page := get("/"); code != 200 || !strings.Contains(page, "<html") {
		t.Fatalf("GET /: %d, %.200q", code, page)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, body := get("/api/state")
		var st struct {
			Nodes []struct {
				Status struct {
					Node    string `json:"node"`
					Workers []any  `json:"workers"`
				} `json:"status"`
				Gone bool `json:"gone"`
			} `json:"nodes"`
		}
		if err := json.Unmarshal([]byte(body), &st); err != nil {
			t.Fatalf("/api/state is not JSON: %v: %.200q", err, body)
		}
		if len(st.Nodes) == 1 && st.Nodes[0].Status.Node == n.name && !st.Nodes[0].Gone && len(st.Nodes[0].Status.Workers) == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the node %s with 2 workers is not in /api/state within 30 s: %.300q", n.name, body)
		}
		time.Sleep(50 * time.Millisecond)
	}
	resp, err := http.Post(strings.TrimSuffix(base, "/")+"/api/action", "application/json",
		strings.NewReader(`{"action":"drain","pool":"default","node":"`+n.name+`"}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Fatalf("an action without --actions: %d, want 403", resp.StatusCode)
	}
	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		exited <- err
		if err != nil {
			t.Fatalf("submit ui on SIGINT: %v; stderr %q", err, stderr.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("submit ui still runs 30 s after SIGINT")
	}
	// The node was not drained by the refused action.
	callOK(t, n.connect(), fnSubject("echo"), `{"x":1}`, nil)
}
