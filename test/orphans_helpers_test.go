package test

// Helpers of the zero-orphan tests (orphans_test.go): the test NATS server,
// process identities and trees, bystanders, and event matchers.

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/lifecycle"
	"github.com/pyfleet/pyfleet/pool"
)

// nastyApp is the test app with the functions the rows need.
func nastyApp() string { return filepath.Join(repoRoot, "test", "apps", "nasty.py") }

// fnSubject is the subject that calls function fn of the pool "default".
func fnSubject(fn string) string { return "pyfleet.req.default." + fn }

// nodeSubject calls fn on one node only.
func nodeSubject(node, fn string) string { return "pyfleet.node." + node + ".default." + fn }

// request sends a call with a Pyfleet-Timeout of timeout and waits a little
// longer than that for the answer.
func request(nc *nats.Conn, subject, body string, timeout time.Duration) (*nats.Msg, error) {
	msg := nats.NewMsg(subject)
	msg.Data = []byte(body)
	msg.Header.Set("Pyfleet-Timeout", strconv.FormatInt(timeout.Milliseconds(), 10))
	return nc.RequestMsg(msg, timeout+5*time.Second)
}

// callOK calls subject, fails the test unless the answer is ok, and decodes
// the answer into out (if not nil).
func callOK(t *testing.T, nc *nats.Conn, subject, body string, out any) *nats.Msg {
	t.Helper()
	msg, err := request(nc, subject, body, 30*time.Second)
	if err != nil {
		t.Fatalf("%s %s: %v", subject, body, err)
	}
	if msg.Header.Get("Pyfleet-Status") != "ok" {
		t.Fatalf("%s %s: %v %s", subject, body, msg.Header, msg.Data)
	}
	if out != nil {
		if err := json.Unmarshal(hostPIDs(t, msg.Data), out); err != nil {
			t.Fatalf("%s: answer %q: %v", subject, msg.Data, err)
		}
	}
	return msg
}

// pidKeys are the fields of the test apps' answers that hold pids.
var pidKeys = []string{"pid", "child", "grandchild"}

// hostPIDs rewrites the pids (pidKeys) of an answer that names the PID
// namespace they are numbered in ("pidns", see test/apps/nasty.py) as this
// process's /proc numbers them, so that a test can find, signal and watch
// those processes in every containment mode. Other answers pass unchanged.
func hostPIDs(t *testing.T, answer []byte) []byte {
	t.Helper()
	var fields map[string]any
	if json.Unmarshal(answer, &fields) != nil {
		return answer
	}
	ns, ok := fields["pidns"].(string)
	if !ok {
		return answer
	}
	for _, k := range pidKeys {
		if inner, ok := fields[k].(float64); ok {
			fields[k] = hostPID(t, ns, int(inner))
		}
	}
	out, err := json.Marshal(fields)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// hostPID is the pid, as this process's /proc numbers it, of the process
// that the PID namespace ns ("pid:[inode]") numbers inner: itself when ns
// is this process's own namespace, else the live process of ns whose
// innermost NSpid is inner. It fails the test if there is none.
func hostPID(t *testing.T, ns string, inner int) int {
	t.Helper()
	if own, err := os.Readlink("/proc/self/ns/pid"); err == nil && own == ns {
		return inner
	}
	for _, pid := range pidsInNamespace(ns) {
		if ids := nsPIDsOf(pid); len(ids) > 0 && ids[len(ids)-1] == inner {
			return pid
		}
	}
	t.Fatalf("no process is pid %d in PID namespace %s", inner, ns)
	return 0
}

// pidsInNamespace lists, as this process's /proc numbers them, the
// processes in the PID namespace ns ("pid:[inode]").
func pidsInNamespace(ns string) []int {
	entries, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if other, err := os.Readlink("/proc/" + e.Name() + "/ns/pid"); err == nil && other == ns {
			out = append(out, pid)
		}
	}
	return out
}

// nsPIDsOf returns pid's numbers in each PID namespace it is in, outermost
// first (NSpid in /proc/<pid>/status), or nil if it is gone.
func nsPIDsOf(pid int) []int {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return nil
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "NSpid:"); ok {
			var out []int
			for _, f := range strings.Fields(rest) {
				n, _ := strconv.Atoi(f)
				out = append(out, n)
			}
			return out
		}
	}
	return nil
}

// Answers of the nasty app.
type (
	pidReply struct {
		PID int `json:"pid"`
	}
	spawnReply struct {
		PID   int `json:"pid"`
		Child int `json:"child"`
	}
	setsidReply struct {
		PID        int `json:"pid"`
		Grandchild int `json:"grandchild"`
	}
	mpReply struct {
		PID        int  `json:"pid"`
		Child      int  `json:"child"`
		Grandchild int  `json:"grandchild"`
		New        bool `json:"new"`
	}
)

// startTestNATS starts a real nats-server (JetStream on, stored in a temp
// dir) owned by the test, killed in cleanup, and returns its URL. Nodes that
// a test kills with SIGKILL run against it: an embedded server would die with
// them, and with it the events of the node that starts next.
func startTestNATS(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(repoRoot, ".tools", "bin", "nats-server")
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("no nats-server at %s: run `make tools` (make test does)", bin)
	}
	store := shortTempDir(t)
	var lastErr error
	for range 5 {
		port, err := pickFreePort()
		if err != nil {
			t.Fatal(err)
		}
		url := fmt.Sprintf("nats://127.0.0.1:%d", port)
		cmd := exec.Command(bin, "-a", "127.0.0.1", "-p", strconv.Itoa(port), "-js", "-sd", store)
		out := &strings.Builder{}
		cmd.Stdout, cmd.Stderr = out, out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan struct{})
		go func() {
			_ = cmd.Wait()
			close(exited)
		}()
		stop := func() {
			_ = cmd.Process.Kill()
			<-exited
		}
		deadline := time.Now().Add(15 * time.Second)
		for time.Now().Before(deadline) {
			select {
			case <-exited:
				lastErr = fmt.Errorf("nats-server exited: %s", out)
			default:
			}
			if lastErr != nil {
				break
			}
			nc, err := nats.Connect(url, nats.Timeout(time.Second))
			if err == nil {
				nc.Close()
				t.Cleanup(stop)
				return url
			}
			lastErr = nil
			time.Sleep(20 * time.Millisecond)
		}
		stop()
		if lastErr == nil {
			lastErr = fmt.Errorf("nats-server on %s not ready after 15 s: %s", url, out)
		}
	}
	t.Fatal(lastErr)
	return ""
}

func pickFreePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// connectURL connects to a NATS server the test owns; the connection keeps
// trying to reconnect rather than close, since nodes come and go.
func connectURL(t *testing.T, url string) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(url, nats.Timeout(5*time.Second))
	if err != nil {
		t.Fatalf("connect to %s: %v", url, err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// onNATS returns o for a node that joins the NATS server at url.
func onNATS(url string, o nodeOptions) nodeOptions {
	o.extra = append(slices.Clip(o.extra), "--nats", url)
	return o
}

// startSleeper starts `sleep 86400` in a process group of its own, with env
// added to the test's environment, and kills it in cleanup. pyfleet did not
// start it, so nothing pyfleet does may kill it. It must outlive the longest
// test (200 stress rounds take over ten minutes), or it would seem killed.
func startSleeper(t *testing.T, env ...string) lifecycle.Identity {
	t.Helper()
	cmd := exec.Command("sleep", "86400")
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Unreaped until cleanup, so this pid cannot be reused meanwhile.
	id, err := lifecycle.ReadIdentity(cmd.Process.Pid)
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// bystanders are processes pyfleet did not start: a plain sleep, and one
// that carries pyfleet's worker marker for a run no state dir knows.
type bystanders []lifecycle.Identity

func startBystanders(t *testing.T) bystanders {
	t.Helper()
	fake := fmt.Sprintf("bystander%d/0badc0de", os.Getpid())
	return bystanders{
		startSleeper(t),
		startSleeper(t, lifecycle.EnvWorkerRun+"="+fake, lifecycle.EnvWorkerID+"="+fake+"/w1-1", lifecycle.EnvWorkerSpawn+"=1"),
	}
}

// assertAlive fails the test if a bystander was killed.
func (b bystanders) assertAlive(t *testing.T) {
	t.Helper()
	for _, id := range b {
		if !id.Alive() {
			t.Errorf("bystander %v was killed; pyfleet did not start it", id)
		}
	}
}

// identify reads the identities of pids, failing the test if one is gone.
func identify(t *testing.T, pids ...int) []lifecycle.Identity {
	t.Helper()
	out := make([]lifecycle.Identity, 0, len(pids))
	for _, pid := range pids {
		id, err := lifecycle.ReadIdentity(pid)
		if err != nil || !id.Alive() {
			t.Fatalf("pid %d is not running: %v", pid, err)
		}
		out = append(out, id)
	}
	return out
}

// aliveOf returns the identities in ids whose process still runs.
func aliveOf(ids []lifecycle.Identity) []lifecycle.Identity {
	var out []lifecycle.Identity
	for _, id := range ids {
		if id.Alive() {
			out = append(out, id)
		}
	}
	return out
}

// waitGone polls /proc until no process in ids runs, or timeout passes. It
// returns how long that took and what is still running.
func waitGone(ids []lifecycle.Identity, timeout time.Duration) (time.Duration, []lifecycle.Identity) {
	start := time.Now()
	for {
		left := aliveOf(ids)
		if len(left) == 0 || time.Since(start) > timeout {
			return time.Since(start), left
		}
		time.Sleep(200 * time.Microsecond)
	}
}

// assertGone fails the test unless every process in ids is gone within
// timeout; what is left is killed so that it cannot leak into other tests.
func assertGone(t *testing.T, what string, ids []lifecycle.Identity, timeout time.Duration) {
	t.Helper()
	if _, left := waitGone(ids, timeout); len(left) > 0 {
		killIdentities(left)
		t.Errorf("%s: %d processes still running after %s: %v", what, len(left), timeout, left)
	}
}

// killIdentities kills processes that a failed test left, by pidfd after
// checking the identity.
func killIdentities(ids []lifecycle.Identity) {
	for _, id := range ids {
		p, err := os.FindProcess(id.PID)
		if err != nil {
			continue
		}
		if id.Alive() {
			_ = p.Kill()
		}
		_ = p.Release()
	}
}

// pidsOf lists the pids of ids.
func pidsOf(ids []lifecycle.Identity) []int {
	out := make([]int, len(ids))
	for i, id := range ids {
		out[i] = id.PID
	}
	slices.Sort(out)
	return out
}

// runProcesses lists the live processes carrying the marker of one run of a node.
func runProcesses(node, run string) []lifecycle.Identity {
	return markedProcesses(lifecycle.EnvWorkerRun + "=" + node + "/" + run + "\x00")
}

// procInfo holds the fields of /proc/<pid>/stat the tests look at.
type procInfo struct {
	state           byte
	ppid, pgrp, sid int
}

func readProcInfo(pid int) (procInfo, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return procInfo{}, err
	}
	end := strings.LastIndexByte(string(b), ')')
	if end < 0 {
		return procInfo{}, errors.New("bad stat")
	}
	f := strings.Fields(string(b[end+1:]))
	if len(f) < 4 {
		return procInfo{}, errors.New("bad stat")
	}
	var pi procInfo
	pi.state = f[0][0]
	pi.ppid, _ = strconv.Atoi(f[1])
	pi.pgrp, _ = strconv.Atoi(f[2])
	pi.sid, _ = strconv.Atoi(f[3])
	return pi, nil
}

// workerPIDs lists the node's worker processes: its children that lead a
// process group of their own. (A grandchild that called setsid and lost its
// parent is the node's child too, as the node is a child subreaper, but it
// does not lead its group.)
func (n *nodeProc) workerPIDs() []int {
	var out []int
	for _, id := range n.processes() {
		pi, err := readProcInfo(id.PID)
		if err == nil && pi.ppid == n.cmd.Process.Pid && pi.pgrp == id.PID && !isTemplate(id.PID) {
			out = append(out, id.PID)
		}
	}
	slices.Sort(out)
	return out
}

// tree names every live process of the node's workers' trees (its inits
// left out: assertNoLeftovers covers them), and checks that want are among
// them.
func (n *nodeProc) tree(t *testing.T, want ...int) []lifecycle.Identity {
	t.Helper()
	ids := n.userProcesses()
	have := pidsOf(ids)
	for _, pid := range want {
		if !slices.Contains(have, pid) {
			t.Fatalf("pid %d does not carry node %s's marker; the node's processes: %v", pid, n.name, have)
		}
	}
	return ids
}

// killNine sends SIGKILL to the poolnode and returns the moment it did.
func (n *nodeProc) killNine(t *testing.T) time.Time {
	t.Helper()
	at := time.Now()
	if err := n.cmd.Process.Kill(); err != nil {
		t.Fatalf("kill -9 %s: %v", n.name, err)
	}
	return at
}

// killNineWithHelpers sends SIGKILL to the poolnode and, first, to each of
// its children that is not a worker (carries no worker marker): whatever
// the node runs beside its workers dies with it, as when the OOM killer or a
// cgroup kill takes them all. It returns the moment the node was killed.
func (n *nodeProc) killNineWithHelpers(t *testing.T) time.Time {
	t.Helper()
	node := n.cmd.Process.Pid
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if pi, err := readProcInfo(pid); err != nil || pi.ppid != node {
			continue
		}
		env, err := os.ReadFile("/proc/" + e.Name() + "/environ")
		if err != nil || strings.Contains(string(env), lifecycle.EnvWorkerRun+"=") {
			continue
		}
		p, err := os.FindProcess(pid) // a pidfd: the signal reaches this process or none
		if err != nil {
			continue
		}
		// Our grandchild: its pid cannot be reused while the node, which
		// has not reaped it, lives; the check after the pidfd closes the gap.
		if pi, err := readProcInfo(pid); err == nil && pi.ppid == node {
			t.Logf("kill -9 of the node's helper %d", pid)
			_ = p.Kill()
		}
		_ = p.Release()
	}
	return n.killNine(t)
}

// waitTouch waits for a blocking nasty function to write its touch file and
// returns the worker pid it wrote.
func waitTouch(t *testing.T, path string, timeout time.Duration) int {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		b, err := os.ReadFile(path)
		if err == nil {
			var r pidReply
			if err := json.Unmarshal(hostPIDs(t, b), &r); err != nil {
				t.Fatalf("%s: %q: %v", path, b, err)
			}
			return r.PID
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not written within %s: the call did not start", path, timeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// matching returns the events so far that match, in order.
func matching(ev *events, match func(lifecycle.Event) bool) []lifecycle.Event {
	ev.mu.Lock()
	defer ev.mu.Unlock()
	var out []lifecycle.Event
	for _, e := range ev.got {
		if match(e) {
			out = append(out, e)
		}
	}
	return out
}

// firstIndex is the position of the first matching event, or -1.
func firstIndex(ev *events, match func(lifecycle.Event) bool) int {
	ev.mu.Lock()
	defer ev.mu.Unlock()
	for i, e := range ev.got {
		if match(e) {
			return i
		}
	}
	return -1
}

// lastIndex is the position of the last matching event, or -1.
func lastIndex(ev *events, match func(lifecycle.Event) bool) int {
	ev.mu.Lock()
	defer ev.mu.Unlock()
	for i := len(ev.got) - 1; i >= 0; i-- {
		if match(ev.got[i]) {
			return i
		}
	}
	return -1
}

func allOf(ms ...func(lifecycle.Event) bool) func(lifecycle.Event) bool {
	return func(e lifecycle.Event) bool {
		for _, m := range ms {
			if !m(e) {
				return false
			}
		}
		return true
	}
}

func ofNode(node string) func(lifecycle.Event) bool {
	return func(e lifecycle.Event) bool { return e.Node == node }
}

func withPID(pid int) func(lifecycle.Event) bool {
	return func(e lifecycle.Event) bool { return e.PID == pid }
}

func terminatedFor(reason string) func(lifecycle.Event) bool {
	// A --preload template's own events (pool.TemplateWorker) are not a worker's.
	return func(e lifecycle.Event) bool {
		return e.Kind == lifecycle.KindTerminated && e.Reason == reason && e.Worker != pool.TemplateWorker
	}
}

// runOf waits for the node_started event of the poolnode n and returns its run.
func runOf(t *testing.T, ev *events, n *nodeProc) string {
	t.Helper()
	e := ev.waitFor(10*time.Second, allOf(kind(lifecycle.KindNodeStarted), ofNode(n.name), withPID(n.cmd.Process.Pid)))
	if e.Run == "" {
		t.Fatalf("node_started without a run: %+v", e)
	}
	return e.Run
}

// stopClean sends SIGTERM and expects exit status 0 and nothing left.
func (n *nodeProc) stopClean(t *testing.T) {
	t.Helper()
	n.signal(syscall.SIGTERM)
	if code := n.wait(60 * time.Second); code != 0 {
		t.Fatalf("node %s: exit status %d after SIGTERM, want 0", n.name, code)
	}
	n.assertNoLeftovers(time.Second)
}

// startedBy splits a node's tree: the processes its workers started, and
// for each of those whether it is in a worker's process group.
func startedBy(workers, tree []lifecycle.Identity) ([]lifecycle.Identity, map[int]bool) {
	var started []lifecycle.Identity
	inGroup := map[int]bool{}
	for _, id := range tree {
		if slices.Contains(workers, id) {
			continue
		}
		started = append(started, id)
		if pi, err := readProcInfo(id.PID); err == nil && slices.Contains(pidsOf(workers), pi.pgrp) {
			inGroup[id.PID] = true
		}
	}
	return started, inGroup
}

// undoomed returns the processes in ids that run and have no SIGKILL
// pending: nothing already sent will end them.
func undoomed(ids []lifecycle.Identity) []lifecycle.Identity {
	var out []lifecycle.Identity
	for _, id := range aliveOf(ids) {
		if !killPending(id.PID) {
			out = append(out, id)
		}
	}
	return out
}

// killPending reports whether a SIGKILL waits for pid (for one of its
// threads or the whole process).
func killPending(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return false
	}
	for line := range strings.Lines(string(b)) {
		k, v, ok := strings.Cut(line, ":")
		if !ok || k != "SigPnd" && k != "ShdPnd" {
			continue
		}
		if mask, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64); err == nil && mask&(1<<(uint(syscall.SIGKILL)-1)) != 0 {
			return true
		}
	}
	return false
}

// loggedEvents returns the lifecycle events the node's log holds as JSON
// lines of their own (what its guardian reports after the node died).
func (n *nodeProc) loggedEvents() []lifecycle.Event {
	var out []lifecycle.Event
	for line := range strings.Lines(n.log()) {
		var e lifecycle.Event
		if json.Unmarshal([]byte(line), &e) == nil && e.Kind != "" {
			out = append(out, e)
		}
	}
	return out
}

func filterEvents(es []lifecycle.Event, match func(lifecycle.Event) bool) []lifecycle.Event {
	var out []lifecycle.Event
	for _, e := range es {
		if match(e) {
			out = append(out, e)
		}
	}
	return out
}

// requireCgroup skips the test, saying why, on a host where the poolnode
// cannot use cgroup containment; this test machine (root, cgroup v2) can.
func requireCgroup(t *testing.T) {
	t.Helper()
	c, err := lifecycle.NewCgroupContainment(lifecycle.Marker{Node: fmt.Sprintf("probe%d", os.Getpid()), Run: strconv.FormatInt(time.Now().UnixNano(), 36)})
	if err != nil {
		t.Skipf("no cgroup containment on this host: %v", err)
	}
	if err := c.(interface{ Close() error }).Close(); err != nil {
		t.Fatal(err)
	}
}

// modeNode is a node in a containment mode, its workers preloaded or not.
func modeNode(url, mode, state, name string, workers int, preload bool) nodeOptions {
	return onNATS(url, nodeOptions{app: nastyApp(), workers: workers, stateDir: state, name: name, preload: preload, extra: []string{"--containment", mode}})
}

// runCgroupOf is the run's cgroup, as the node recorded it in its state dir.
func runCgroupOf(t *testing.T, state, node, run string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(state, "nodes", node+"."+run+".cgroup"))
	if err != nil {
		t.Fatalf("the node in cgroup mode recorded no cgroup: %v", err)
	}
	dir := strings.TrimSpace(string(b))
	// Whatever a failed test leaves there goes, so that no cgroup outlives it.
	t.Cleanup(func() { removeCgroupDir(t, dir) })
	return dir
}

// removeCgroupDir kills what is left in a cgroup tree and removes it.
func removeCgroupDir(t *testing.T, dir string) {
	if _, err := os.Stat(dir); err != nil {
		return
	}
	t.Errorf("cgroup %s was left behind; removing it", dir)
	_ = os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0)
	var dirs []string
	_ = filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, path)
		}
		return nil
	})
	deadline := time.Now().Add(5 * time.Second)
	for _, d := range slices.Backward(dirs) {
		for os.Remove(d) != nil && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// cleanChild is what clean_env_spawn answers: a sleep started with
// env={"PATH": ...}, so carrying no marker.
func cleanChild(t *testing.T, n *nodeProc, nc *nats.Conn, newSession bool) (worker int, child lifecycle.Identity) {
	t.Helper()
	var r spawnReply
	callOK(t, nc, nodeSubject(n.name, "clean_env_spawn"), fmt.Sprintf(`{"new_session":%v}`, newSession), &r)
	child = identify(t, r.Child)[0]
	t.Cleanup(func() { killIdentities(aliveOf([]lifecycle.Identity{child})) })
	if slices.Contains(pidsOf(n.processes()), r.Child) {
		t.Fatalf("the clean-environment child %d carries the node's marker", r.Child)
	}
	pi, err := readProcInfo(r.Child)
	if err != nil {
		t.Fatal(err)
	}
	if inGroup := pi.pgrp == r.PID; inGroup == newSession || newSession && pi.sid != r.Child {
		t.Fatalf("child %d: %+v; want it in worker %d's group: %v, in a session of its own: %v", r.Child, pi, r.PID, !newSession, newSession)
	}
	return r.PID, child
}

// supervisedOf is the process the node supervises for the Python worker
// pid, which lifecycle events name: the worker's init where it has one,
// else the worker itself.
func supervisedOf(t *testing.T, pid int) int {
	t.Helper()
	pi, err := readProcInfo(pid)
	if err != nil {
		t.Fatalf("worker %d: %v", pid, err)
	}
	if isInit(pi.ppid) {
		return pi.ppid
	}
	return pid
}
