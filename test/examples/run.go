package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/pyfleet/pyfleet/lifecycle"
)

// Example is one directory of examples/: app.py served by a node with
// Workers workers (Reduced in the test), client.py run against it.
type Example struct {
	Name             string
	Workers, Reduced int
	Concurrency      int // calls in flight per worker; 0: the node's default
}

// Examples are the five scenarios of issue 12, in the order they read.
var Examples = []Example{
	{Name: "basic", Workers: 2, Reduced: 2},
	{Name: "concurrent", Workers: 100, Reduced: 8},
	{Name: "sessions", Workers: 4, Reduced: 4},
	{Name: "streaming", Workers: 2, Reduced: 2},
	{Name: "advanced", Workers: 2, Reduced: 2},
}

// Result is how one example went.
type Result struct {
	Example Example
	Workers int
	Figure  string // the client's "figure:" line
	Left    int    // the node's processes alive after its stop: must be 0
	Took    time.Duration
	Output  string // the client's stdout and stderr
	Err     error
}

// Line is the example's line in the table make examples prints.
func (r Result) Line() string {
	figure := r.Figure
	if r.Err != nil {
		figure = "FAILED: " + r.Err.Error()
	}
	return fmt.Sprintf("%-10s %7d  %-4d  %s", r.Example.Name, r.Workers, r.Left, figure)
}

// runner runs examples with one poolnode binary and one interpreter, which
// needs pyfleet[client].
type runner struct {
	poolnode, python, dir string
	log                   io.Writer // the node's log when something fails
}

// Bounds, generous for a loaded 2-core machine: 100 workers take seconds
// to start there.
const (
	serveTimeout  = 3 * time.Minute
	clientTimeout = 5 * time.Minute
	stopTimeout   = time.Minute
	// How long the kernel may take to deliver the kills of a stop before
	// a process still alive counts as left.
	settle = 5 * time.Second
)

// Run serves ex's app, runs its client, stops the node, and counts what
// is left of the node: its own process, its guardian, and every process
// carrying its workers' marker. Whatever is left is then killed, so that
// a failed run does not leak into the next.
func (r runner) Run(ex Example, reduced bool) Result {
	res := Result{Example: ex, Workers: ex.Workers}
	if reduced {
		res.Workers = ex.Reduced
	}
	start := time.Now()
	defer func() { res.Took = time.Since(start) }()

	state, err := os.MkdirTemp("", "pfex") // short: worker sockets live under it
	if err != nil {
		res.Err = err
		return res
	}
	defer os.RemoveAll(state)
	name := fmt.Sprintf("ex-%s-%d", ex.Name, os.Getpid())
	args := []string{
		"--listen", "127.0.0.1:0",
		"--node", name,
		"--workers", strconv.Itoa(res.Workers),
		"--app", filepath.Join(r.dir, ex.Name, "app.py"),
		"--python", r.python,
		"--state-dir", state,
		"--log-format", "json",
	}
	if ex.Concurrency > 0 {
		args = append(args, "--concurrency", strconv.Itoa(ex.Concurrency))
	}
	node := exec.Command(r.poolnode, args...)
	stderr, err := node.StderrPipe()
	if err != nil {
		res.Err = err
		return res
	}
	if err := node.Start(); err != nil {
		res.Err = fmt.Errorf("start poolnode: %w", err)
		return res
	}
	log := &bytes.Buffer{}
	serving := make(chan string, 1) // the URL, once the node serves
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		watchLog(io.TeeReader(stderr, log), serving)
		_ = node.Wait()
	}()

	res.Err = func() error {
		var url string
		select {
		case url = <-serving:
		case <-exited:
			return fmt.Errorf("poolnode exited before serving: %v", node.ProcessState)
		case <-time.After(serveTimeout):
			return fmt.Errorf("poolnode not serving after %s", serveTimeout)
		}
		out, err := r.client(ex, url)
		res.Output = out
		if err != nil {
			return err
		}
		res.Figure = figure(out)
		if res.Figure == "" {
			return errors.New("the client printed no figure: line")
		}
		return nil
	}()

	// Stop as Ctrl-C would, and wait for the node to finish its drain.
	_ = node.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
		if code := node.ProcessState.ExitCode(); code != 0 && res.Err == nil {
			res.Err = fmt.Errorf("poolnode exited %d after SIGTERM", code)
		}
	case <-time.After(stopTimeout):
		_ = node.Process.Kill()
		<-exited
		if res.Err == nil {
			res.Err = fmt.Errorf("poolnode still running %s after SIGTERM", stopTimeout)
		}
	}
	left := leftovers(name, node.Process.Pid)
	res.Left = len(left)
	for _, id := range left {
		_ = syscall.Kill(id.PID, syscall.SIGKILL)
	}
	if (res.Err != nil || res.Left > 0) && r.log != nil {
		fmt.Fprintf(r.log, "--- %s node log:\n%s\n", ex.Name, log.String())
	}
	return res
}

// client runs ex's client.py against url and returns what it printed.
func (r runner) client(ex Example, url string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), clientTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, r.python, filepath.Join(r.dir, ex.Name, "client.py"), url)
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		return string(out), fmt.Errorf("client.py still running after %s", clientTimeout)
	}
	if err != nil {
		return string(out), fmt.Errorf("client.py: %v: %s", err, lastLine(out))
	}
	return string(out), nil
}

// watchLog reads the node's JSON log until it ends, sending the embedded
// server's URL once the node serves.
func watchLog(r io.Reader, serving chan<- string) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	var url string
	for sc.Scan() {
		var e map[string]any
		if json.Unmarshal(sc.Bytes(), &e) != nil {
			continue
		}
		switch {
		case e["msg"] == "embedded NATS server listening":
			url, _ = e["url"].(string)
		case e["msg"] == "serving" && e["logger"] == nil: // the node's, after the service's own
			select {
			case serving <- url:
			default:
			}
		}
	}
}

// figure is the text of the client's last "figure: " line.
func figure(out string) string {
	var fig string
	for _, line := range strings.Split(out, "\n") {
		if f, ok := strings.CutPrefix(line, "figure: "); ok {
			fig = strings.TrimSpace(f)
		}
	}
	return fig
}

func lastLine(out []byte) string {
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	return lines[len(lines)-1]
}

// leftovers are the node's processes still alive once the kernel has had
// settle to deliver the stop's kills: the node itself, its guardian
// (poolnode __pyfleet_guardian NODE ...), and every process whose
// environment carries the node's worker marker (workers and whatever they
// started, wherever it went).
func leftovers(node string, nodePID int) []lifecycle.Identity {
	deadline := time.Now().Add(settle)
	for {
		left := scan(node, nodePID)
		if len(left) == 0 || time.Now().After(deadline) {
			return left
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func scan(node string, nodePID int) []lifecycle.Identity {
	marker := []byte(lifecycle.EnvWorkerRun + "=" + node + "/")
	guardian := []byte(lifecycle.GuardianArg + "\x00" + node + "\x00")
	entries, _ := os.ReadDir("/proc")
	var out []lifecycle.Identity
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		ours := pid == nodePID
		if !ours {
			env, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "environ"))
			ours = bytes.HasPrefix(env, marker) || bytes.Contains(env, append([]byte{0}, marker...))
		}
		if !ours {
			cmdline, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
			ours = bytes.Contains(cmdline, guardian)
		}
		if !ours {
			continue
		}
		if id, err := lifecycle.ReadIdentity(pid); err == nil && id.Alive() {
			out = append(out, id)
		}
	}
	return out
}
