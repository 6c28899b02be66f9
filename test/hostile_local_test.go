package test

// Issue 9, "Local safety": what another local user, a cleaner of /tmp, or
// the app's own code can do to a node from the same machine. Each test runs
// real poolnodes and ends, where a node serves, with assertStillServing.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	bolt "go.etcd.io/bbolt"

	"github.com/pyfleet/pyfleet/internal/testkit"
	"github.com/pyfleet/pyfleet/lifecycle"
)

// writeRecords stores recs in the registry at path as they are, with bbolt
// directly, the way a dead node left them (or an attacker forged them):
// lifecycle.Registry.Put would name the calling process, alive, as their
// node, and the run would count as alive.
func writeRecords(t *testing.T, path string, mode os.FileMode, recs ...lifecycle.Record) {
	t.Helper()
	db, err := bolt.Open(path, mode, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists([]byte("workers"))
		if err != nil {
			return err
		}
		for _, rec := range recs {
			v, err := json.Marshal(rec)
			if err != nil {
				return err
			}
			if err := b.Put([]byte(rec.Node+"\x00"+rec.Run+"\x00"+rec.Worker), v); err != nil {
				return err
			}
		}
		return nil
	})
	if cerr := db.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
}

// plantDeadRun writes into dir what a dead run would leave for the reaper:
// a registry record naming victim as its worker (pid, start time, boot id,
// all readable from /proc for anyone's process) and the run's lock file,
// unlocked.
func plantDeadRun(t *testing.T, dir string, victim lifecycle.Identity, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Join(dir, "nodes"), 0o755); err != nil {
		t.Fatal(err)
	}
	rec := lifecycle.Record{Node: "planted", Run: "deadbeef", Worker: "w1-1", Pool: "default",
		PID: victim.PID, PGID: victim.PID, StartTime: victim.StartTime, BootID: victim.BootID, State: lifecycle.StateRunning}
	writeRecords(t, filepath.Join(dir, "registry.db"), mode, rec)
	lock := filepath.Join(dir, "nodes", rec.Node+"."+rec.Run+".lock")
	if err := os.WriteFile(lock, nil, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(lock, mode); err != nil {
		t.Fatal(err)
	}
}

// chownTree gives dir and everything in it to uid.
func chownTree(t *testing.T, dir string, uid, gid int) {
	t.Helper()
	err := filepath.Walk(dir, func(p string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(p, uid, gid)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// refusedStart starts a node on stateDir and expects exit 2 and a message
// that names path and says want.
func refusedStart(t *testing.T, stateDir, path, want string) {
	t.Helper()
	n := launchNode(t, nodeOptions{workers: 1, stateDir: stateDir})
	if code := n.wait(60 * time.Second); code != 2 {
		t.Fatalf("exit %d, want 2\n%s", code, n.log())
	}
	for _, line := range strings.Split(n.log(), "\n") {
		if strings.HasPrefix(line, "poolnode: ") && strings.Contains(line, path+" ") && strings.Contains(line, want) {
			t.Logf("%s", line)
			return
		}
	}
	t.Errorf("no error line naming %s and saying %q:\n%s", path, want, n.log())
}

func modeOf(t *testing.T, path string) os.FileMode {
	t.Helper()
	st, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Mode().Perm()
}

// A state dir another local user could write to is refused before the
// node does anything with it (exit 2, naming the path and the problem):
// "--state-dir /tmp/x" planted by another user with a forged registry
// cannot make this node kill a victim. The same planted state in a dir of
// our own is trusted, and the victim dies: that is what the check stops. A
// node creates a missing state dir 0700 with 0600 files, and still starts
// on a 0755 dir of earlier versions.
func TestHostileStateDirOfAnotherUser(t *testing.T) {
	uid, gid := testkit.OtherUser(t)

	t.Run("planted by another user with a forged registry", func(t *testing.T) {
		victim := startSleeper(t)
		planted := shortTempDir(t)
		if err := os.Chmod(planted, 0o755); err != nil {
			t.Fatal(err)
		}
		plantDeadRun(t, planted, victim, 0o644)
		chownTree(t, planted, uid, gid)
		refusedStart(t, planted, planted, fmt.Sprintf("is owned by uid %d, not by this user", uid))
		if !victim.Alive() {
			t.Fatalf("the victim %v was killed", victim)
		}
	})
	t.Run("another user's, even 0700", func(t *testing.T) {
		dir := shortTempDir(t)
		chownTree(t, dir, uid, gid)
		refusedStart(t, dir, dir, fmt.Sprintf("is owned by uid %d", uid))
	})
	t.Run("group-writable", func(t *testing.T) {
		dir := shortTempDir(t)
		if err := os.Chmod(dir, 0o770); err != nil {
			t.Fatal(err)
		}
		refusedStart(t, dir, dir, "is writable by its group (mode 0770)")
	})
	t.Run("world-writable", func(t *testing.T) {
		dir := shortTempDir(t)
		if err := os.Chmod(dir, 0o757); err != nil {
			t.Fatal(err)
		}
		refusedStart(t, dir, dir, "is writable by everyone (mode 0757)")
	})
	t.Run("world-writable nodes/", func(t *testing.T) {
		dir := shortTempDir(t)
		nodes := filepath.Join(dir, "nodes")
		if err := os.Mkdir(nodes, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(nodes, 0o777); err != nil {
			t.Fatal(err)
		}
		refusedStart(t, dir, nodes, "is writable by its group")
	})
	t.Run("run/ of another user", func(t *testing.T) {
		dir := shortTempDir(t)
		run := filepath.Join(dir, "run")
		if err := os.Mkdir(run, 0o700); err != nil {
			t.Fatal(err)
		}
		chownTree(t, run, uid, gid)
		refusedStart(t, dir, run, fmt.Sprintf("is owned by uid %d", uid))
	})
	t.Run("registry others could write", func(t *testing.T) {
		victim := startSleeper(t)
		dir := shortTempDir(t)
		plantDeadRun(t, dir, victim, 0o666)
		db := filepath.Join(dir, "registry.db")
		// The lock file would be refused too; the registry is the point.
		if err := os.Chmod(filepath.Join(dir, "nodes", "planted.deadbeef.lock"), 0o600); err != nil {
			t.Fatal(err)
		}
		refusedStart(t, dir, db, "is writable by group or others (mode 0666)")
		if !victim.Alive() {
			t.Fatalf("the victim %v was killed", victim)
		}
	})

	t.Run("our own dir, created and of earlier versions", func(t *testing.T) {
		// The control: the planted state, in a dir that is ours, is what a
		// dead run of ours would leave, and the reaper acts on it.
		victim := startSleeper(t)
		old := shortTempDir(t)
		if err := os.Chmod(old, 0o755); err != nil {
			t.Fatal(err)
		}
		plantDeadRun(t, old, victim, 0o644) // readable by others: made 0600
		n := startNode(t, nodeOptions{stateDir: old})
		if _, left := waitGone([]lifecycle.Identity{victim}, 10*time.Second); len(left) > 0 {
			t.Fatalf("the planted record in our own dir did not lead the reaper to %v: the forgery test proves nothing\n%s", victim, n.log())
		}
		if m := modeOf(t, old); m != 0o755 {
			t.Errorf("existing state dir changed to %04o", m)
		}
		if m := modeOf(t, filepath.Join(old, "registry.db")); m != 0o600 {
			t.Errorf("registry.db left %04o, want 0600", m)
		}
		locks, _ := filepath.Glob(filepath.Join(old, "nodes", n.name+".*.lock"))
		if len(locks) != 1 || modeOf(t, locks[0]) != 0o600 {
			t.Errorf("node lock files %v, want one, 0600", locks)
		}

		fresh := filepath.Join(shortTempDir(t), "state")
		m := startNode(t, nodeOptions{stateDir: fresh})
		if mode := modeOf(t, fresh); mode != 0o700 {
			t.Errorf("new state dir %04o, want 0700", mode)
		}
		for _, p := range []string{"nodes", "run"} {
			if mode := modeOf(t, filepath.Join(fresh, p)); mode != 0o700 {
				t.Errorf("new %s/ %04o, want 0700", p, mode)
			}
		}
		locks, _ = filepath.Glob(filepath.Join(fresh, "nodes", "*.lock"))
		if len(locks) != 1 || modeOf(t, locks[0]) != 0o600 || modeOf(t, filepath.Join(fresh, "registry.db")) != 0o600 {
			t.Errorf("new lock files %v and registry.db: want one lock, both 0600", locks)
		}
		assertStillServing(t, m, m.connect(), 2)
		assertStillServing(t, n, n.connect(), 2)
	})
}

// A live node's lock file is removed (and sometimes replaced by an empty,
// unlocked file: a tombstone to the eye) again and again while it serves,
// while a second node starts on the same state dir (its startup sweep is
// the dangerous one) and both sweep every few hundred milliseconds. No
// worker of the first node is killed or replaced, nothing is reaped, and
// once the removals stop the first node's lock file is back and held.
func TestHostileLockFileRemoved(t *testing.T) {
	url := startTestNATS(t)
	nc := connectURL(t, url)
	ev := watchEvents(t, nc, "default")
	state := shortTempDir(t)
	base := fmt.Sprintf("t%d-lock", os.Getpid())
	// PYFLEET_REAPER_INTERVAL is a test hook (lifecycle.NewReaper): the
	// default sweep is every 10 s.
	a := startNode(t, onNATS(url, nodeOptions{name: base + "-a", stateDir: state, env: []string{"PYFLEET_REAPER_INTERVAL=500ms"}}))
	run := runOf(t, ev, a)
	workers := identify(t, a.workerPIDs()...)
	if len(workers) != 2 {
		t.Fatalf("node a has workers %v, want 2", pidsOf(workers))
	}
	lock := filepath.Join(state, "nodes", a.name+"."+run+".lock")
	if !lifecycle.NodeAlive(state, a.name, run) {
		t.Fatalf("node a's run is not alive before the test: %s", lock)
	}

	stop := make(chan struct{})
	var removals atomic.Int64
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			if err := os.Remove(lock); err != nil {
				continue // not back yet
			}
			removals.Add(1)
			if i%2 == 1 {
				_ = os.WriteFile(lock+".x", nil, 0o600)
				_ = os.Rename(lock+".x", lock)
			}
		}
	})
	b := startNode(t, onNATS(url, nodeOptions{name: base + "-b", stateDir: state, env: []string{"PYFLEET_REAPER_INTERVAL=200ms"}}))
	// Node a puts its file back at each of its sweeps, and the remover takes
	// it again: wait for several rounds of that, past many sweeps of both.
	deadline := time.Now().Add(30 * time.Second)
	for a.countLog("the node's lock file was removed or replaced under it; put it back") < 4 {
		if time.Now().After(deadline) {
			t.Fatalf("node a did not put its lock file back 4 times in 30 s (%d removals)\n%s", removals.Load(), a.log())
		}
		time.Sleep(50 * time.Millisecond)
	}
	close(stop)
	wg.Wait()

	waitUntil(t, 10*time.Second, "node a's lock file back and held", func() bool {
		return lifecycle.NodeAlive(state, a.name, run)
	})
	for _, id := range workers {
		if !id.Alive() {
			t.Errorf("worker %v of node a was killed", id)
		}
	}
	if now := a.workerPIDs(); !slices.Equal(now, pidsOf(workers)) {
		t.Errorf("node a's workers are now %v, were %v", now, pidsOf(workers))
	}
	bad := func(e lifecycle.Event) bool {
		return e.Kind == lifecycle.KindOrphanReaped || e.Kind == lifecycle.KindCrashed || e.Kind == lifecycle.KindTerminated
	}
	if n := ev.count(bad); n > 0 {
		t.Errorf("events %v", ev.kinds())
	}
	if b.hasLog("reaped a dead run", nil) {
		t.Errorf("node b reaped a run:\n%s", b.log())
	}
	t.Logf("%d removals; node a put its lock file back %d times", removals.Load(), a.countLog("the node's lock file was removed or replaced under it; put it back"))
	assertStillServing(t, b, nc, 2)
	assertStillServing(t, a, nc, 2)
}

// Workers do not inherit the node's NATS credentials or any other PYFLEET_
// setting it read, whether the embedded server's user and password or its
// token came from PYFLEET_NATS_*; the per-worker secret is in no
// environment either (it comes on a pipe, see pool/worker.go). The markers
// the reaper needs are there, in the worker and in a child it starts, and so
// is the app's own environment. Calls still work.
func TestHostileWorkerEnvHasNoCredentials(t *testing.T) {
	cases := []struct {
		name   string
		env    []string
		secret string // must appear in no worker's environment
		auth   nats.Option
	}{
		{"user and password", []string{"PYFLEET_NATS_USER=pyfleet", "PYFLEET_NATS_PASSWORD=pw-0f9e8d7c6b5a"}, "pw-0f9e8d7c6b5a", nats.UserInfo("pyfleet", "pw-0f9e8d7c6b5a")},
		{"token", []string{"PYFLEET_NATS_TOKEN=tok-1a2b3c4d5e6f"}, "tok-1a2b3c4d5e6f", nats.Token("tok-1a2b3c4d5e6f")},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			env := append(slices.Clip(c.env), "PYFLEET_QUEUE_LIMIT=999", "PYFLEET_MAX_SESSIONS=4321", "APP_SETTING=kept-for-the-app")
			n := startNode(t, nodeOptions{env: env})
			if _, err := nats.Connect(n.url, nats.Timeout(5*time.Second)); err == nil {
				t.Fatal("the embedded server took a connection without credentials: the test would prove nothing")
			}
			nc, err := nats.Connect(n.url, nats.Timeout(5*time.Second), c.auth)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(nc.Close)
			callOK(t, nc, fnSubject("spawn"), `{"seconds": 600}`, nil)
			// Every process of the node's: workers, their inits where they
			// have one, and the child the call started.
			procs := pidsOf(n.processes())
			if want := 3 + len(procs) - len(n.userProcesses()); len(procs) != want || len(n.workerPIDs()) != 2 {
				t.Fatalf("the node's processes %v, want 2 workers and a child (and their inits)", procs)
			}
			for _, pid := range procs {
				raw, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/environ")
				if err != nil {
					t.Fatal(err)
				}
				if bytes.Contains(raw, []byte(c.secret)) {
					t.Errorf("pid %d: the NATS credential is in /proc/%d/environ", pid, pid)
				}
				vars := map[string]string{}
				for kv := range bytes.SplitSeq(raw, []byte{0}) {
					if k, v, ok := strings.Cut(string(kv), "="); ok {
						vars[k] = v
					}
				}
				for k := range vars {
					switch k {
					case lifecycle.EnvWorkerRun, lifecycle.EnvWorkerID, lifecycle.EnvWorkerSpawn,
						"PYFLEET_WORKER_LIFELINE_FD", "PYFLEET_WORKER_SECRET_FD": // fd numbers, not secrets
					default:
						if strings.HasPrefix(k, "PYFLEET_") {
							t.Errorf("pid %d inherited %s=%s", pid, k, vars[k])
						}
					}
					if strings.Contains(k, "SECRET") && k != "PYFLEET_WORKER_SECRET_FD" {
						t.Errorf("pid %d has %s in its environment", pid, k)
					}
				}
				if !strings.HasPrefix(vars[lifecycle.EnvWorkerRun], n.name+"/") || !strings.HasPrefix(vars[lifecycle.EnvWorkerID], n.name+"/") {
					t.Errorf("pid %d lacks the markers: %s=%q, %s=%q", pid,
						lifecycle.EnvWorkerRun, vars[lifecycle.EnvWorkerRun], lifecycle.EnvWorkerID, vars[lifecycle.EnvWorkerID])
				}
				if vars["APP_SETTING"] != "kept-for-the-app" {
					t.Errorf("pid %d lost the app's own APP_SETTING", pid)
				}
			}
			assertStillServing(t, n, nc, 2)
		})
	}
}

// countLog counts the node's log entries with this message.
func (n *nodeProc) countLog(msg string) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	c := 0
	for _, e := range n.logs {
		if e["msg"] == msg {
			c++
		}
	}
	return c
}
