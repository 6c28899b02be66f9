package test

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestJobTwoMinutesWithDefaults (issue 13): a job longer than
// --request-timeout, submitted without a timeout to a node with default
// flags, runs once and succeeds. Before --job-timeout its deadline was
// --request-timeout (60 s): it was killed, retried 408 five times and
// dead-lettered. It is the one slow test of the deadlines, and it must
// stay one.
func TestJobTwoMinutesWithDefaults(t *testing.T) {
	if testing.Short() {
		t.Skip("runs a two-minute job")
	}
	n := startNode(t, nodeOptions{workers: 1, app: jobsApp()})
	dir := t.TempDir()
	arg := fmt.Sprintf(`{"ms":120000,"id":"long","dir":%q}`, dir)
	start := time.Now()
	out, errOut, code := runSubmit(t, n.url, "", "job", "--id", "long-1", "--wait", "--timeout", "6m", "work", arg)
	took := time.Since(start)
	if code != 0 {
		t.Fatalf("submit job --wait: exit %d\nstdout: %s\nstderr: %s\nnode log:\n%s", code, out, errOut, n.log())
	}
	var got map[string]any
	if err := json.Unmarshal([]byte(out), &got); err != nil || got["id"] != "long" {
		t.Fatalf("result %q: want the payload back (%v)", out, err)
	}
	if took < 2*time.Minute {
		t.Fatalf("the job took %v: it cannot have slept two minutes", took)
	}
	if runs := countLines(t, dir, "long"); runs != 1 {
		t.Fatalf("the job ran %d times, want once\nnode log:\n%s", runs, n.log())
	}
	if strings.Contains(n.log(), "will be delivered again") || strings.Contains(n.log(), "dead-lettered") {
		t.Fatalf("the job was retried or dead-lettered:\n%s", n.log())
	}
}
