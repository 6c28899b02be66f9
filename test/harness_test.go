package test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/lifecycle"
)

// Paths the tests share, set up once by TestMain.
var (
	repoRoot    string
	binDir      string
	python      string
	poolnodeBin string
	submitBin   string
)

func TestMain(m *testing.M) {
	// requireCgroup's containment probes for PID namespaces by starting
	// this binary as their init.
	if len(os.Args) > 1 && os.Args[1] == lifecycle.InitArg {
		os.Exit(lifecycle.InitMain(os.Args[2:]))
	}
	os.Exit(setup(m))
}

func setup(m *testing.M) int {
	wd, err := os.Getwd()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	repoRoot = filepath.Dir(wd)
	python = os.Getenv("PYFLEET_TEST_PYTHON")
	if python == "" {
		python = filepath.Join(repoRoot, "python", ".venv", "bin", "python")
	}
	if _, err := os.Stat(python); err != nil {
		fmt.Fprintf(os.Stderr, "no Python venv at %s: run `make venv` (make test does)\n", python)
		return 1
	}
	binDir, err = os.MkdirTemp("", "pyfleet-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(binDir)
	// Build with -race so the e2e runs also check the binaries under test.
	build := exec.Command("go", "build", "-race", "-o", binDir+"/", "./cmd/poolnode", "./cmd/submit")
	build.Dir = repoRoot
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintf(os.Stderr, "build: %v\n", err)
		return 1
	}
	// The PID namespaces' init, found by poolnode beside itself, as
	// installed. Not race-built: it is not the code under test here
	// (lifecycle's tests run it under -race), and each worker start pays
	// for its start-up.
	build = exec.Command("go", "build", "-o", binDir+"/", "./cmd/pyfleet-init")
	build.Dir = repoRoot
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintf(os.Stderr, "build: %v\n", err)
		return 1
	}
	// The binaries are race-built; without this each would sleep a second
	// at exit, and tests run submit hundreds of times.
	os.Setenv("GORACE", "atexit_sleep_ms=0")
	poolnodeBin = filepath.Join(binDir, "poolnode")
	submitBin = filepath.Join(binDir, "submit")
	return m.Run()
}

// nodeProc is a poolnode started by a test, with its log parsed as it comes.
type nodeProc struct {
	t     *testing.T
	name  string
	cmd   *exec.Cmd
	url   string
	state string
	done  chan struct{} // closed when the process has exited
	err   error         // Wait's result, valid after done

	mu      sync.Mutex
	logs    []map[string]any
	rawLogs bytes.Buffer
	serving chan struct{}
	once    sync.Once
}

type nodeOptions struct {
	name     string
	workers  int
	app      string // default: the demo app
	stateDir string // default: a temp dir
	extra    []string
	env      []string
	bin      string              // default: the race-built poolnode
	dir      string              // working directory (default: the test's)
	noPython bool                // leave --python out: the node chooses
	cred     *syscall.Credential // run as another user (default: as the test)
	// preload runs the node with --preload (in the containment extra
	// names, else the host's default: every mode preloads), and startNode
	// checks that its workers fork from the template and that preload was
	// not turned off.
	preload bool
}

var nodeSeq struct {
	sync.Mutex
	n int
}

// startNode starts a poolnode with an embedded NATS server on a random port
// and waits until it serves. Cleanup kills it if the test did not stop it,
// and fails the test if any process it started is left.
func startNode(t *testing.T, o nodeOptions) *nodeProc {
	t.Helper()
	n := launchNode(t, o)
	select {
	case <-n.serving:
	case <-n.done:
		t.Fatalf("poolnode exited before serving: %v\n%s", n.err, n.log())
	case <-time.After(60 * time.Second):
		t.Fatalf("poolnode not serving after 60 s\n%s", n.log())
	}
	if o.preload && !n.hasLog("template serving: workers fork from it", nil) {
		t.Fatalf("--preload: no template serves\n%s", n.log())
	}
	if o.preload && n.hasLog("preload is off: workers start plainly", nil) {
		t.Fatalf("--preload: preload was turned off\n%s", n.log())
	}
	return n
}

// launchNode starts a poolnode and returns at once.
func launchNode(t *testing.T, o nodeOptions) *nodeProc {
	t.Helper()
	if o.name == "" {
		nodeSeq.Lock()
		nodeSeq.n++
		o.name = fmt.Sprintf("t%d-%d", os.Getpid(), nodeSeq.n)
		nodeSeq.Unlock()
	}
	if o.workers == 0 {
		o.workers = 2
	}
	if o.stateDir == "" {
		o.stateDir = shortTempDir(t)
	}
	args := []string{
		"--listen", "127.0.0.1:0",
		"--node", o.name,
		"--workers", strconv.Itoa(o.workers),
		"--state-dir", o.stateDir,
		"--log-format", "json",
		"--log-level", "debug",
	}
	if !o.noPython {
		args = append(args, "--python", python)
	}
	if o.app != "" {
		args = append(args, "--app", o.app)
	} else {
		args = append(args, "--app", filepath.Join(repoRoot, "python", "examples", "demo.py"))
	}
	args = append(args, o.extra...)
	if o.preload {
		args = append(args, "--preload")
	}
	n := &nodeProc{t: t, name: o.name, state: o.stateDir, done: make(chan struct{}), serving: make(chan struct{})}
	bin := poolnodeBin
	if o.bin != "" {
		bin = o.bin
	}
	n.cmd = exec.Command(bin, args...)
	n.cmd.Env = append(os.Environ(), o.env...)
	n.cmd.Dir = o.dir
	if o.cred != nil {
		n.cmd.SysProcAttr = &syscall.SysProcAttr{Credential: o.cred}
	}
	stderr, err := n.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := n.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		n.readLog(stderr)
	}()
	go func() {
		<-readerDone
		n.err = n.cmd.Wait()
		close(n.done)
	}()
	t.Cleanup(func() {
		select {
		case <-n.done:
		default:
			_ = n.cmd.Process.Kill()
			<-n.done
		}
		n.assertNoLeftovers(5 * time.Second)
		if t.Failed() {
			t.Logf("poolnode %s log:\n%s", n.name, n.log())
		}
	})
	return n
}

func (n *nodeProc) readLog(r io.Reader) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var entry map[string]any
		_ = json.Unmarshal(line, &entry)
		n.mu.Lock()
		n.rawLogs.Write(line)
		n.rawLogs.WriteByte('\n')
		if entry != nil {
			n.logs = append(n.logs, entry)
			if entry["msg"] == "embedded NATS server listening" {
				n.url, _ = entry["url"].(string)
			}
		}
		n.mu.Unlock()
		// The node's own "serving" comes once jobs are pulled too; bus
		// logs one of its own (under a logger name) before that.
		if entry != nil && entry["msg"] == "serving" && entry["logger"] == nil {
			n.once.Do(func() { close(n.serving) })
		}
	}
}

func (n *nodeProc) log() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.rawLogs.String()
}

// hasLog reports whether a log entry with this message and these fields came.
func (n *nodeProc) hasLog(msg string, fields map[string]string) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, e := range n.logs {
		if e["msg"] != msg {
			continue
		}
		ok := true
		for k, v := range fields {
			if fmt.Sprint(e[k]) != v {
				ok = false
			}
		}
		if ok {
			return true
		}
	}
	return false
}

func (n *nodeProc) connect() *nats.Conn {
	n.t.Helper()
	nc, err := nats.Connect(n.url, nats.Timeout(5*time.Second))
	if err != nil {
		n.t.Fatalf("connect to %s: %v", n.url, err)
	}
	n.t.Cleanup(nc.Close)
	return nc
}

func (n *nodeProc) signal(sig syscall.Signal) {
	n.t.Helper()
	if err := n.cmd.Process.Signal(sig); err != nil {
		n.t.Fatalf("signal %v: %v", sig, err)
	}
}

// wait waits for the node to exit and returns its exit code.
func (n *nodeProc) wait(timeout time.Duration) int {
	n.t.Helper()
	select {
	case <-n.done:
	case <-time.After(timeout):
		n.t.Fatalf("poolnode still running after %s\n%s", timeout, n.log())
	}
	if n.cmd.ProcessState == nil {
		n.t.Fatalf("no exit status: %v", n.err)
	}
	return n.cmd.ProcessState.ExitCode()
}

// processes lists every live process carrying this node's worker marker:
// the workers and whatever they started, even processes that left the
// worker's process group.
func (n *nodeProc) processes() []lifecycle.Identity {
	return markedProcesses("PYFLEET_WORKER_RUN=" + n.name + "/")
}

// userProcesses is processes without the workers' inits (see isInit):
// the workers and what they started.
func (n *nodeProc) userProcesses() []lifecycle.Identity {
	var out []lifecycle.Identity
	for _, id := range n.processes() {
		if !isInit(id.PID) && !isTemplate(id.PID) {
			out = append(out, id)
		}
	}
	return out
}

// assertNoLeftovers fails the test if a process the node started is still
// alive after timeout. It polls because the kernel needs a moment to deliver
// the kills; the bound is generous for loaded CI machines, and the
// benchmark measures the real time.
func (n *nodeProc) assertNoLeftovers(timeout time.Duration) {
	n.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		left := n.processes()
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			for _, id := range left {
				_ = syscall.Kill(id.PID, syscall.SIGKILL) // do not leak into other tests
			}
			n.t.Errorf("node %s left %d processes: %v", n.name, len(left), left)
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// markedProcesses scans /proc for live, non-zombie processes whose
// environment holds marker.
func markedProcesses(marker string) []lifecycle.Identity {
	entries, _ := os.ReadDir("/proc")
	var out []lifecycle.Identity
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		env, err := os.ReadFile(filepath.Join("/proc", e.Name(), "environ"))
		if err != nil || !bytes.Contains(env, []byte("\x00"+marker)) && !bytes.HasPrefix(env, []byte(marker)) {
			continue
		}
		id, err := lifecycle.ReadIdentity(pid)
		if err != nil || !id.Alive() {
			continue
		}
		out = append(out, id)
	}
	return out
}

// shortTempDir is a temp dir with a short path: worker sockets live under
// it and Unix socket paths are limited to 107 bytes.
func shortTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "pf")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// events collects lifecycle events of a pool as they are published.
type events struct {
	t   *testing.T
	sub *nats.Subscription
	mu  sync.Mutex
	got []lifecycle.Event
	new chan struct{}
}

func watchEvents(t *testing.T, nc *nats.Conn, pool string) *events {
	t.Helper()
	ev := &events{t: t, new: make(chan struct{}, 1)}
	sub, err := nc.Subscribe("pyfleet.evt."+pool+".>", func(m *nats.Msg) {
		var e lifecycle.Event
		if err := json.Unmarshal(m.Data, &e); err != nil {
			t.Errorf("bad event JSON on %s: %v: %s", m.Subject, err, m.Data)
			return
		}
		if !strings.HasSuffix(m.Subject, "."+e.Kind) {
			t.Errorf("event %s on subject %s", e.Kind, m.Subject)
		}
		ev.mu.Lock()
		ev.got = append(ev.got, e)
		ev.mu.Unlock()
		select {
		case ev.new <- struct{}{}:
		default:
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	ev.sub = sub
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	return ev
}

// waitFor returns the first event (after skipping `after` matches) that
// matches, or fails the test.
func (ev *events) waitFor(timeout time.Duration, match func(lifecycle.Event) bool) lifecycle.Event {
	ev.t.Helper()
	deadline := time.After(timeout)
	for {
		ev.mu.Lock()
		for _, e := range ev.got {
			if match(e) {
				ev.mu.Unlock()
				return e
			}
		}
		ev.mu.Unlock()
		select {
		case <-ev.new:
		case <-deadline:
			ev.t.Fatalf("no matching event within %s; got %v", timeout, ev.kinds())
			return lifecycle.Event{}
		}
	}
}

func (ev *events) count(match func(lifecycle.Event) bool) int {
	ev.mu.Lock()
	defer ev.mu.Unlock()
	n := 0
	for _, e := range ev.got {
		if match(e) {
			n++
		}
	}
	return n
}

func (ev *events) kinds() []string {
	ev.mu.Lock()
	defer ev.mu.Unlock()
	var out []string
	for _, e := range ev.got {
		out = append(out, e.Kind+"/"+e.Worker)
	}
	return out
}

func kind(k string) func(lifecycle.Event) bool {
	return func(e lifecycle.Event) bool { return e.Kind == k }
}

// runSubmit runs the submit binary against url and returns its stdout,
// stderr and exit code.
func runSubmit(t *testing.T, url string, stdin string, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(submitBin, append([]string{args[0], "--nats", url}, args[1:]...)...)
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			t.Fatalf("submit %v: %v", args, err)
		}
		code = ee.ExitCode()
	}
	return out.String(), errb.String(), code
}

func writeFile(path, content string) error {
	return os.WriteFile(path, []byte(content), 0o644)
}
