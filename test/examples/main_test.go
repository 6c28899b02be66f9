package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/pyfleet/pyfleet/lifecycle"
)

// TestExamples runs every example as make examples does, concurrent with
// 8 workers instead of 100: each client must finish with its figure, and
// each node must leave no process behind.
func TestExamples(t *testing.T) {
	python := os.Getenv("PYFLEET_TEST_PYTHON")
	if python == "" {
		python, _ = filepath.Abs("../../python/.venv/bin/python")
	}
	if out, err := exec.Command(python, "-c", "import nats, pyfleet.worker").CombinedOutput(); err != nil {
		t.Fatalf("%s cannot run the examples (it needs pyfleet[client]: make venv): %v\n%s", python, err, out)
	}
	bin := t.TempDir()
	build := exec.Command("go", "build", "-o", bin+"/", "../../cmd/poolnode")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build poolnode: %v\n%s", err, out)
	}
	var log bytes.Buffer
	r := runner{poolnode: filepath.Join(bin, "poolnode"), python: python, dir: "../../examples", log: &log}
	for _, ex := range Examples {
		t.Run(ex.Name, func(t *testing.T) {
			log.Reset()
			res := r.Run(ex, true)
			t.Log(res.Line())
			if res.Err != nil {
				t.Errorf("%v\nclient output:\n%s\n%s", res.Err, res.Output, log.String())
			}
			if res.Left != 0 {
				t.Errorf("%d processes of the node left after its stop", res.Left)
			}
			if res.Workers != ex.Reduced {
				t.Errorf("ran with %d workers, want %d", res.Workers, ex.Reduced)
			}
		})
	}
}

// TestLeftoversSeesMarkedProcesses: the count in the table is not zero
// by construction: a process carrying a node's worker marker is counted
// until it is gone.
func TestLeftoversSeesMarkedProcesses(t *testing.T) {
	node := "leftover-probe-" + strconv.Itoa(os.Getpid())
	cmd := exec.Command("sleep", "60")
	cmd.Env = append(os.Environ(), lifecycle.EnvWorkerRun+"="+node+"/run1")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})
	if left := scan(node, 0); len(left) != 1 || left[0].PID != cmd.Process.Pid {
		t.Fatalf("scan found %v, want the marked sleep %d", left, cmd.Process.Pid)
	}
	_ = cmd.Process.Kill()
	<-exited
	if left := leftovers(node, 0); len(left) != 0 {
		t.Errorf("leftovers %v after the kill and reap, want none", left)
	}
}
