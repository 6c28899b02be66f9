package test

import (
	"encoding/json"
	"fmt"
	"regexp"
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

// TestSubmitStatus: `submit status ID` prints a job's status from the
// bucket the node keeps, as a table or as JSON, and exits 1 for a job it
// has no word of.
func TestSubmitStatus(t *testing.T) {
	n := startNode(t, nodeOptions{workers: 1, app: jobsApp()})
	if out, errOut, code := runSubmit(t, n.url, "", "job", "--id", "st-1", "--wait", "--timeout", "60s", "work", `{"id":"st-1"}`); code != 0 {
		t.Fatalf("submit job: exit %d: %s %s", code, out, errOut)
	}
	out, errOut, code := runSubmit(t, n.url, "", "status", "st-1")
	if code != 0 {
		t.Fatalf("submit status: exit %d: %s", code, errOut)
	}
	for _, want := range []string{`(?m)^state +done$`, `(?m)^attempts +1$`, `(?m)^node +` + n.name + `$`, `(?m)^function +work$`, `(?m)^worker +w\d+$`, `(?m)^finished +20`} {
		if !regexp.MustCompile(want).MatchString(out) {
			t.Errorf("submit status prints no %s:\n%s", want, out)
		}
	}
	out, _, code = runSubmit(t, n.url, "", "status", "--json", "st-1")
	var st map[string]any
	if err := json.Unmarshal([]byte(out), &st); code != 0 || err != nil || st["state"] != "done" || st["attempts"] != 1.0 || st["id"] != "st-1" {
		t.Fatalf("submit status --json: exit %d, %q (%v)", code, out, err)
	}
	_, errOut, code = runSubmit(t, n.url, "", "status", "no-such-job")
	if code != 1 || !strings.Contains(errOut, "no status for job no-such-job in pool default") {
		t.Fatalf("status of an unknown job: exit %d, %q", code, errOut)
	}
}

// TestSubmitCancel: `submit cancel ID` stops a running job, whose
// `submit job --wait` then ends 499 Cancelled, and refuses a job that has
// ended.
func TestSubmitCancel(t *testing.T) {
	n := startNode(t, nodeOptions{workers: 1, app: jobsApp()})
	dir := t.TempDir()
	type waited struct {
		out, errOut string
		code        int
	}
	done := make(chan waited, 1)
	go func() {
		out, errOut, code := runSubmitNoFatal(n.url, "job", "--id", "cx-1", "--wait", "--timeout", "2m", "work",
			fmt.Sprintf(`{"ms":60000,"id":"cx-1","dir":%q}`, dir))
		done <- waited{out, errOut, code}
	}()
	for end := time.Now().Add(60 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		out, _, _ := runSubmit(t, n.url, "", "status", "--json", "cx-1")
		if strings.Contains(out, `"state":"running"`) {
			break
		}
		if time.Now().After(end) {
			t.Fatalf("job never running: %s", out)
		}
	}
	if out, errOut, code := runSubmit(t, n.url, "", "cancel", "cx-1"); code != 0 || out != "cancelled cx-1\n" {
		t.Fatalf("submit cancel: exit %d, %q, %q", code, out, errOut)
	}
	var w waited
	select {
	case w = <-done:
	case <-time.After(60 * time.Second):
		t.Fatalf("submit job --wait still waiting after the cancel\n%s", n.log())
	}
	if w.code != 1 || !strings.Contains(w.errOut, "499 Cancelled: the job was cancelled") {
		t.Fatalf("submit job --wait of a cancelled job: exit %d, %q, %q", w.code, w.out, w.errOut)
	}
	if runs := countLines(t, dir, "cx-1"); runs != 0 {
		t.Fatalf("the cancelled job finished %d times", runs)
	}
	out, errOut, code := runSubmit(t, n.url, "", "cancel", "cx-1")
	if code != 1 || !strings.Contains(errOut, "job cx-1 has ended already (cancelled)") {
		t.Fatalf("second cancel: exit %d, %q, %q", code, out, errOut)
	}
}
