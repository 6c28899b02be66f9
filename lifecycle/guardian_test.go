package lifecycle

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// The guardian ignores the terminal's signals, and when its node's end of
// the pipe closes (as it does when the node dies) it kills every process of
// the run, setsid escapees included, and nothing else.
func TestGuardianKillsTheRunWhenTheNodeGoes(t *testing.T) {
	m := Marker{Node: "n", Run: uniqueRun(t), Worker: "w1"}
	cmd := helperCmd("escape")
	cmd.Env = append(cmd.Env, m.Env()...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out := readLinesOf(t, cmd)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_, _ = KillMarked(m, nil)
		_ = cmd.Wait()
	})
	other := Marker{Node: "n", Run: uniqueRun(t), Worker: "w1"}
	bystander := helperCmd("sleep")
	bystander.Env = append(bystander.Env, other.Env()...)
	if err := bystander.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = bystander.Process.Kill()
		_ = bystander.Wait()
	})
	var ids []Identity
	// Announced, not scanned: a scan could count the short-lived probe a
	// Go program forks before its first start of a process (os/exec's
	// pidfd check), which carries the marker too.
	waitFor(t, "worker and escapee", 5*time.Second, func() bool { return len(out.pids("pid")) == 2 })
	ids = identities(out.pids("pid"))
	if marked := markedPids(t, m); len(marked) != 2 || len(ids) != 2 {
		t.Fatalf("marked %v, announced %v; want the worker and its escapee", marked, ids)
	}

	t.Setenv("GORACE", "atexit_sleep_ms=0") // the guardian is this test binary
	state := t.TempDir()
	if err := os.MkdirAll(filepath.Join(state, "nodes"), 0o700); err != nil {
		t.Fatal(err)
	}
	g, err := StartGuardian(Marker{Node: m.Node, Run: m.Run}, state, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := g.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := g.cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	select {
	case <-g.done:
		t.Fatal("the guardian exited on a signal; only its node's end may stop it")
	case <-time.After(200 * time.Millisecond):
	}
	for _, id := range ids {
		if !id.Alive() {
			t.Fatalf("%v killed before the node went", id)
		}
	}

	start := time.Now()
	g.Stop() // closes the node's end, as the kernel does when the node dies
	for _, id := range ids {
		if id.Alive() {
			t.Errorf("%v survived its run's guardian", id)
		}
	}
	t.Logf("run killed %s after its node's end closed", time.Since(start))
	if id, err := ReadIdentity(bystander.Process.Pid); err != nil || !id.Alive() {
		t.Error("the guardian killed a process of another run")
	}
	if _, err := StartGuardian(Marker{Node: "n", Run: "r", Worker: "w"}, state, nil); err == nil {
		t.Error("a guardian of a single worker was accepted")
	}

	// The kills reach NATS through the next node on the state dir.
	var published eventLog
	n, err := PublishJournals(state, published.add)
	if err != nil || n != len(ids) {
		t.Fatalf("PublishJournals = %d, %v; want %d", n, err, len(ids))
	}
	for _, ev := range published.get() {
		if ev.Kind != KindOrphanReaped || ev.Run != m.Run || ev.PID == 0 {
			t.Errorf("published %+v", ev)
		}
	}
	if n, _ := PublishJournals(state, published.add); n != 0 {
		t.Errorf("a journal was published twice")
	}
}
