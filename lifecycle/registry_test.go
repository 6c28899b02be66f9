package lifecycle

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pyfleet/pyfleet/internal/testkit"
)

func TestRegistryPutListDelete(t *testing.T) {
	reg := mustRegistry(t, t.TempDir())
	rec := Record{Node: "n", Run: "r", Worker: "w1", Pool: "p", State: StateStarting}
	if err := reg.Put(rec); err != nil {
		t.Fatal(err)
	}
	rec.PID, rec.PGID, rec.StartTime, rec.BootID, rec.State = 42, 42, 7, "boot", StateRunning
	if err := reg.Put(rec); err != nil {
		t.Fatal(err)
	}
	if err := reg.Put(Record{Node: "n", Run: "r", Worker: "w2", State: StateStarting}); err != nil {
		t.Fatal(err)
	}
	recs, err := reg.List()
	if err != nil {
		t.Fatal(err)
	}
	// Put records the writer as the run's node.
	rec = stamped(t, rec)
	if len(recs) != 2 || recs[0] != rec {
		t.Fatalf("List = %+v", recs)
	}
	if self, _ := ReadIdentity(os.Getpid()); recs[1].NodeIdentity() != self {
		t.Errorf("NodeIdentity = %v, want this process, %v", recs[1].NodeIdentity(), self)
	}
	if id := recs[0].Identity(); id != (Identity{PID: 42, StartTime: 7, BootID: "boot"}) {
		t.Errorf("Identity = %v", id)
	}

	// deleteIf leaves a record that changed since it was read.
	old := rec
	old.State = StateStarting
	if err := reg.deleteIf(old); err != nil {
		t.Fatal(err)
	}
	if recs, _ := reg.List(); len(recs) != 2 {
		t.Fatalf("deleteIf removed a changed record: %+v", recs)
	}
	if err := reg.deleteIf(rec); err != nil {
		t.Fatal(err)
	}
	if err := reg.Delete("n", "r", "w2"); err != nil {
		t.Fatal(err)
	}
	if err := reg.Delete("n", "r", "missing"); err != nil {
		t.Fatal(err)
	}
	if recs, _ := reg.List(); len(recs) != 0 {
		t.Fatalf("records left: %+v", recs)
	}
	if err := reg.Put(Record{Node: "a.b", Run: "r", Worker: "w"}); !errors.Is(err, ErrInvalidName) {
		t.Errorf("Put with a dotted node: %v", err)
	}
}

func TestRecordSetProcess(t *testing.T) {
	s := mustSpawner(t)
	p, _ := mustStart(t, s, "exit7")
	var rec Record
	rec.SetProcess(p)
	if rec.Identity() != p.Identity() || rec.PGID != p.PGID() {
		t.Errorf("record %+v for %v", rec, p.Identity())
	}
}

func TestRegistrySharedByProcesses(t *testing.T) {
	// Nodes on one machine share a state dir: two processes writing at
	// once while this one writes too must all succeed.
	path := filepath.Join(t.TempDir(), "registry.db")
	reg, err := OpenRegistry(path)
	if err != nil {
		t.Fatal(err)
	}
	var cmds []*exec.Cmd
	for _, prefix := range []string{"a", "b"} {
		cmd := helperCmd("registry-put")
		cmd.Env = append(cmd.Env, "REG_PATH="+path, "REG_PREFIX="+prefix)
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		cmds = append(cmds, cmd)
	}
	for i := range 20 {
		if err := reg.Put(Record{Node: "n", Run: "r", Worker: "c" + string(rune('a'+i)), State: StateStarting}); err != nil {
			t.Error(err)
		}
	}
	for _, cmd := range cmds {
		if err := cmd.Wait(); err != nil {
			t.Errorf("writer: %v", err)
		}
	}
	recs, err := reg.List()
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 60 {
		t.Errorf("%d records, want 60", len(recs))
	}
}

func TestNodeLock(t *testing.T) {
	dir := t.TempDir()
	if NodeAlive(dir, "n", "r1") {
		t.Fatal("a run that never started is alive")
	}
	lock, err := AcquireNodeLock(dir, "n", "r1")
	if err != nil {
		t.Fatal(err)
	}
	if !NodeAlive(dir, "n", "r1") {
		t.Fatal("locked run not alive")
	}
	if NodeAlive(dir, "n", "r2") {
		t.Fatal("another run alive")
	}
	if _, err := AcquireNodeLock(dir, "n", "r1"); !errors.Is(err, ErrRunTaken) {
		t.Fatalf("second AcquireNodeLock: %v, want ErrRunTaken", err)
	}
	if runs, err := lockedRuns(dir); err != nil || len(runs) != 1 || runs[0] != (Marker{Node: "n", Run: "r1"}) {
		t.Fatalf("lockedRuns = %v, %v (temporary files must not count)", runs, err)
	}
	if err := lock.Release(); err != nil {
		t.Fatal(err)
	}
	if err := lock.Release(); err != nil {
		t.Fatal(err)
	}
	if NodeAlive(dir, "n", "r1") {
		t.Fatal("released run alive")
	}
	if _, err := os.Stat(lockPath(dir, "n", "r1")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("lock file after Release: %v", err)
	}
	for _, name := range [][2]string{{"a.b", "r"}, {"n", "x/y"}, {"", "r"}} {
		if _, err := AcquireNodeLock(dir, name[0], name[1]); !errors.Is(err, ErrInvalidName) {
			t.Errorf("AcquireNodeLock(%q, %q): %v", name[0], name[1], err)
		}
	}
}

func TestReaperRun(t *testing.T) {
	dir := t.TempDir()
	s := mustSpawner(t)
	m := Marker{Node: "dead", Run: uniqueRun(t)}
	node, ids := startFakeNode(t, s, dir, m)
	node.Kill()

	var events eventLog
	r, err := NewReaper(ReaperConfig{StateDir: dir, Registry: mustRegistry(t, dir), Spawner: s, Events: events.add,
		Interval: 20 * time.Millisecond, AdoptInterval: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	waitFor(t, "the dead run's processes to be reaped", 5*time.Second, func() bool {
		for _, id := range ids {
			if id.Alive() {
				return false
			}
		}
		return true
	})
	waitFor(t, "the tombstone to go", 5*time.Second, func() bool {
		_, err := os.Stat(lockPath(dir, m.Node, m.Run))
		return errors.Is(err, os.ErrNotExist)
	})
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run = %v", err)
	}
	if _, err := NewReaper(ReaperConfig{StateDir: dir}); err == nil {
		t.Error("NewReaper without a registry succeeded")
	}
}

func TestNodeLockEnsure(t *testing.T) {
	dir := t.TempDir()
	lock, err := AcquireNodeLock(dir, "n", "r1")
	if err != nil {
		t.Fatal(err)
	}
	path := lockPath(dir, "n", "r1")
	if restored, err := lock.Ensure(); restored || err != nil {
		t.Fatalf("Ensure with the file in place = %v, %v", restored, err)
	}
	for _, how := range []string{"removed", "replaced", "nodes dir removed"} {
		switch how {
		case "removed":
			err = os.Remove(path)
		case "replaced":
			err = os.WriteFile(path+".new", nil, 0o644)
			if err == nil {
				err = os.Rename(path+".new", path)
			}
		case "nodes dir removed":
			err = os.RemoveAll(nodesDir(dir))
		}
		if err != nil {
			t.Fatal(err)
		}
		if NodeAlive(dir, "n", "r1") {
			t.Fatalf("%s: alive before Ensure", how)
		}
		if restored, err := lock.Ensure(); !restored || err != nil {
			t.Fatalf("%s: Ensure = %v, %v", how, restored, err)
		}
		if !NodeAlive(dir, "n", "r1") {
			t.Fatalf("%s: not alive after Ensure", how)
		}
		if st, err := os.Stat(path); err != nil || st.Mode().Perm() != 0o600 {
			t.Fatalf("%s: lock file after Ensure: %v, %v", how, st.Mode(), err)
		}
		if runs, err := lockedRuns(dir); err != nil || len(runs) != 1 {
			t.Fatalf("%s: lockedRuns = %v, %v (temporary files must be gone)", how, runs, err)
		}
	}
	if err := lock.Release(); err != nil {
		t.Fatal(err)
	}
	if restored, err := lock.Ensure(); restored || err != nil {
		t.Fatalf("Ensure after Release = %v, %v", restored, err)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("lock file after Release and Ensure: %v", err)
	}
}

// The registry and the lock files are 0600; existing ones that others could
// read are made 0600, ones that others could write or that belong to someone
// else are refused with an error naming the file.
func TestStateFilesArePrivate(t *testing.T) {
	mode := func(path string) os.FileMode {
		t.Helper()
		st, err := os.Lstat(path)
		if err != nil {
			t.Fatal(err)
		}
		return st.Mode().Perm()
	}
	refused := func(err error, path, why string) {
		t.Helper()
		if !errors.Is(err, ErrNotPrivate) || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), why) {
			t.Errorf("%s: error %v, want ErrNotPrivate naming it and %q", path, err, why)
		}
	}

	dir := t.TempDir()
	db := filepath.Join(dir, "registry.db")
	mustRegistry(t, dir)
	lock, err := AcquireNodeLock(dir, "n", "r1")
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Release()
	tomb := lockPath(dir, "n", "r1")
	if m := mode(db); m != 0o600 {
		t.Errorf("new registry mode %04o", m)
	}
	if m := mode(tomb); m != 0o600 {
		t.Errorf("new lock file mode %04o", m)
	}

	// Readable by others: fixed.
	for _, path := range []string{db, tomb} {
		if err := os.Chmod(path, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	mustRegistry(t, dir)
	if _, err := AcquireNodeLock(dir, "n", "r2"); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{db, tomb} {
		if m := mode(path); m != 0o600 {
			t.Errorf("%s: mode %04o after opening, want 0600", path, m)
		}
	}

	// Writable by others: refused.
	for _, m := range []os.FileMode{0o620, 0o602} {
		if err := os.Chmod(db, m); err != nil {
			t.Fatal(err)
		}
		_, err := OpenRegistry(db)
		refused(err, db, "writable by group or others")
		if err := os.Chmod(tomb, m); err != nil {
			t.Fatal(err)
		}
		_, err = AcquireNodeLock(dir, "n", "r3")
		refused(err, tomb, "writable by group or others")
	}
	for _, path := range []string{db, tomb} {
		if err := os.Chmod(path, 0o600); err != nil {
			t.Fatal(err)
		}
	}

	// Not a regular file: refused.
	other := filepath.Join(t.TempDir(), "elsewhere.db")
	if err := os.WriteFile(other, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(t.TempDir(), "registry.db")
	if err := os.Symlink(other, link); err != nil {
		t.Fatal(err)
	}
	_, err = OpenRegistry(link)
	refused(err, link, "not a regular file")

	// Another user's: refused.
	uid, gid := testkit.OtherUser(t)
	for _, path := range []string{db, tomb} {
		if err := os.Chown(path, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	_, err = OpenRegistry(db)
	refused(err, db, "owned by uid "+strconv.Itoa(uid))
	_, err = AcquireNodeLock(dir, "n", "r4")
	refused(err, tomb, "owned by uid "+strconv.Itoa(uid))
	for _, path := range []string{db, tomb} {
		if err := os.Chown(path, os.Getuid(), os.Getgid()); err != nil {
			t.Fatal(err)
		}
	}
}
