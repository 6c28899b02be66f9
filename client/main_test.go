package client_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"go.uber.org/goleak"

	"github.com/pyfleet/pyfleet/lifecycle"
)

// What TestMain sets up for every test and example: an embedded NATS
// server with JetStream, and one real node of pool "default" (2 workers of
// testdata/app.py) connected to it.
var (
	srv      *server.Server
	natsURL  string
	mainNode *node

	repoRoot    string
	python      string
	poolnodeBin string
)

// uniqueJobID names a job that no earlier run of a test in this process
// submitted: the NATS server and its dedup window live as long as the
// process, so a fixed id would be a duplicate under go test -count=2.
func uniqueJobID(name string) string {
	return fmt.Sprintf("%s-%d", name, jobIDs.Add(1))
}

var jobIDs atomic.Int64

func TestMain(m *testing.M) {
	code, err := setup(m)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

func setup(m *testing.M) (int, error) {
	wd, err := os.Getwd()
	if err != nil {
		return 1, err
	}
	repoRoot = filepath.Dir(wd)
	python = os.Getenv("PYFLEET_TEST_PYTHON")
	if python == "" {
		python = filepath.Join(repoRoot, "python", ".venv", "bin", "python")
	}
	if _, err := os.Stat(python); err != nil {
		return 1, fmt.Errorf("no Python venv at %s: run `make venv` (make test does)", python)
	}
	binDir, err := os.MkdirTemp("", "pyfleet-client-bin-")
	if err != nil {
		return 1, err
	}
	defer os.RemoveAll(binDir)
	build := exec.Command("go", "build", "-o", binDir+"/", "./cmd/poolnode")
	build.Dir = repoRoot
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		return 1, fmt.Errorf("building poolnode: %w", err)
	}
	poolnodeBin = filepath.Join(binDir, "poolnode")

	store, err := os.MkdirTemp("", "pyfleet-client-js-")
	if err != nil {
		return 1, err
	}
	defer os.RemoveAll(store)
	srv, err = server.NewServer(&server.Options{
		Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: store, NoLog: true, NoSigs: true,
	})
	if err != nil {
		return 1, err
	}
	srv.Start()
	defer func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	}()
	if !srv.ReadyForConnections(10 * time.Second) {
		return 1, errors.New("nats server not ready")
	}
	natsURL = srv.ClientURL()

	mainNode, err = launch(fmt.Sprintf("c%d-main", os.Getpid()), "default")
	if err != nil {
		return 1, err
	}
	code := m.Run()
	if err := mainNode.stop(); err != nil {
		return 1, err
	}
	// The node and its workers are gone, the server is about to be: what
	// is left of the tests' goroutines is a leak.
	srv.Shutdown()
	srv.WaitForShutdown()
	if err := goleak.Find(); err != nil && code == 0 {
		return 1, err
	}
	return code, nil
}

// node is a poolnode process started by a test, connected to srv.
type node struct {
	name  string
	cmd   *exec.Cmd
	state string
	done  chan struct{} // closed once the process is reaped
	err   error         // Wait's, once done

	mu  sync.Mutex
	log bytes.Buffer
}

// launch starts a poolnode of pool on srv with the test app and waits until
// it serves.
func launch(name, pool string, extra ...string) (*node, error) {
	// A short path: the workers' Unix sockets live under it.
	state, err := os.MkdirTemp("", "pfc")
	if err != nil {
		return nil, err
	}
	args := append([]string{
		"--nats", natsURL, "--node", name, "--pool", pool, "--workers", "2",
		"--app", filepath.Join(repoRoot, "client", "testdata", "app.py"),
		"--python", python, "--state-dir", state, "--log-format", "json",
	}, extra...)
	n := &node{name: name, state: state, done: make(chan struct{}), cmd: exec.Command(poolnodeBin, args...)}
	stderr, err := n.cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	if err := n.cmd.Start(); err != nil {
		return nil, err
	}
	serving := make(chan struct{})
	go func() {
		n.read(stderr, serving)
		n.err = n.cmd.Wait()
		close(n.done)
	}()
	select {
	case <-serving:
		return n, nil
	case <-n.done:
		os.RemoveAll(state)
		return nil, fmt.Errorf("poolnode %s exited before serving: %v\n%s", name, n.err, n.logText())
	case <-time.After(60 * time.Second):
		n.kill()
		return nil, fmt.Errorf("poolnode %s not serving after 60 s\n%s", name, n.logText())
	}
}

// read keeps the node's log and says when it serves: the node's own
// "serving", which comes once jobs are pulled too (bus logs one of its own,
// under a logger name, before that).
func (n *node) read(r io.Reader, serving chan struct{}) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	var once sync.Once
	for sc.Scan() {
		n.mu.Lock()
		n.log.Write(sc.Bytes())
		n.log.WriteByte('\n')
		n.mu.Unlock()
		var e map[string]any
		if json.Unmarshal(sc.Bytes(), &e) == nil && e["msg"] == "serving" && e["logger"] == nil {
			once.Do(func() { close(serving) })
		}
	}
	_, _ = io.Copy(io.Discard, r)
}

func (n *node) logText() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.log.String()
}

// stop ends the node the way an operator does (SIGTERM), waits for it, and
// fails if a process it started is left.
func (n *node) stop() error {
	_ = n.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-n.done:
	case <-time.After(30 * time.Second):
		n.kill()
		return fmt.Errorf("poolnode %s still running 30 s after SIGTERM\n%s", n.name, n.logText())
	}
	return n.leftovers()
}

// kill sends SIGKILL and reaps the node.
func (n *node) kill() {
	_ = n.cmd.Process.Kill()
	<-n.done
}

// leftovers waits for the node's workers to be gone (after a SIGKILL of the
// node its guardian kills them), and kills and names any still there after
// a generous bound.
func (n *node) leftovers() error {
	defer os.RemoveAll(n.state)
	marker := []byte("PYFLEET_WORKER_RUN=" + n.name + "/")
	deadline := time.Now().Add(15 * time.Second)
	for {
		left := marked(marker)
		if len(left) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			for _, pid := range left {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
			return fmt.Errorf("node %s left processes %v", n.name, left)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// marked lists the live processes whose environment holds marker: the
// node's workers and whatever they started.
func marked(marker []byte) []int {
	entries, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		env, err := os.ReadFile(filepath.Join("/proc", e.Name(), "environ"))
		if err != nil || !bytes.HasPrefix(env, marker) && !bytes.Contains(env, append([]byte{0}, marker...)) {
			continue
		}
		if id, err := lifecycle.ReadIdentity(pid); err == nil && id.Alive() {
			out = append(out, pid)
		}
	}
	return out
}

// startNode starts a node of its own for one test; cleanup stops it (or
// reaps it if the test killed it) and fails the test on leftovers.
func startNode(t *testing.T, pool string, extra ...string) *node {
	t.Helper()
	n, err := launch(fmt.Sprintf("c%d-%s", os.Getpid(), pool), pool, extra...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		select {
		case <-n.done:
			if err := n.leftovers(); err != nil {
				t.Error(err)
			}
		default:
			if err := n.stop(); err != nil {
				t.Error(err)
			}
		}
		if t.Failed() {
			t.Logf("poolnode %s log:\n%s", n.name, n.logText())
		}
	})
	return n
}
