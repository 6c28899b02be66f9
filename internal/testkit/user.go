package testkit

import (
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"strconv"
	"sync/atomic"
	"testing"
	"time"
)

var otherUsers atomic.Int64

// OtherUser creates a throwaway system user for the test (deleted at its
// end) and returns its uid and gid, for files and directories that must
// belong to someone else. It needs root, as chown does; without root or
// useradd the test is skipped.
func OtherUser(t testing.TB) (uid, gid int) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: only root can give a file or directory to another user")
	}
	if _, err := exec.LookPath("useradd"); err != nil {
		t.Skip("useradd is missing: cannot create another user to own the file or directory")
	}
	name := fmt.Sprintf("pyfleet-test-%d-%d", os.Getpid(), otherUsers.Add(1))
	var out []byte
	var err error
	// useradd fails while another one holds /etc/passwd's lock: retry.
	for range 20 {
		out, err = exec.Command("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name).CombinedOutput()
		if err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("useradd %s: %v: %s", name, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("userdel", name).CombinedOutput(); err != nil {
			t.Errorf("userdel %s: %v: %s", name, err, out)
		}
	})
	u, err := user.Lookup(name)
	if err != nil {
		t.Fatal(err)
	}
	uid, _ = strconv.Atoi(u.Uid)
	gid, _ = strconv.Atoi(u.Gid)
	return uid, gid
}
