package node

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/pyfleet/pyfleet/internal/testkit"
)

func permOf(t *testing.T, path string) os.FileMode {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Mode().Perm() | st.Mode()&os.ModeSticky
}

func TestStateDirCreatedPrivate(t *testing.T) {
	base := t.TempDir()
	dir := filepath.Join(base, "a", "state")
	got, err := prepareStateDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got != dir {
		t.Errorf("path %q, want %q", got, dir)
	}
	for _, p := range []string{dir, filepath.Dir(dir)} {
		if m := permOf(t, p); m != 0o700 {
			t.Errorf("%s created with mode %04o, want 0700", p, m)
		}
	}
}

// A state dir of earlier versions (0755, subdirectories too) still serves,
// and is left as it is.
func TestStateDirAcceptsOwn0755(t *testing.T) {
	dir := t.TempDir()
	for _, p := range []string{dir, filepath.Join(dir, "nodes"), filepath.Join(dir, "run"), filepath.Join(dir, "jetstream")} {
		if err := os.MkdirAll(p, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := prepareStateDir(dir); err != nil {
		t.Fatal(err)
	}
	if m := permOf(t, dir); m != 0o755 {
		t.Errorf("mode changed to %04o", m)
	}
}

func TestStateDirRefusesWhatOthersCanWrite(t *testing.T) {
	uid, gid := testkit.OtherUser(t)
	cases := []struct {
		name  string
		setup func(dir string) error // makes dir bad
		path  func(dir string) string
		want  string
	}{
		{"group-writable", func(d string) error { return os.Chmod(d, 0o770) }, same, "writable by its group (mode 0770)"},
		{"world-writable", func(d string) error { return os.Chmod(d, 0o707) }, same, "writable by everyone (mode 0707)"},
		{"world-writable sticky, like /tmp", func(d string) error { return os.Chmod(d, 0o777|os.ModeSticky) }, same, "writable by its group"},
		{"owned by another user", func(d string) error { return os.Chown(d, uid, gid) }, same,
			fmt.Sprintf("is owned by uid %d, not by this user", uid)},
		{"owned by another user, 0700", func(d string) error { return chown(d, uid, gid, 0o700) }, same,
			fmt.Sprintf("is owned by uid %d", uid)},
		{"nodes/ group-writable", func(d string) error { return mkdir(filepath.Join(d, "nodes"), 0o775) }, sub("nodes"), "writable by its group"},
		{"run/ owned by another user", func(d string) error {
			if err := mkdir(filepath.Join(d, "run"), 0o700); err != nil {
				return err
			}
			return os.Chown(filepath.Join(d, "run"), uid, gid)
		}, sub("run"), fmt.Sprintf("is owned by uid %d", uid)},
		{"jetstream/ world-writable", func(d string) error { return mkdir(filepath.Join(d, "jetstream"), 0o757) }, sub("jetstream"), "writable by everyone"},
		{"nodes/ a symbolic link", func(d string) error { return os.Symlink(t.TempDir(), filepath.Join(d, "nodes")) }, sub("nodes"), "is a symbolic link, not a directory"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := c.setup(dir); err != nil {
				t.Fatal(err)
			}
			_, err := prepareStateDir(dir)
			if err == nil {
				t.Fatal("accepted")
			}
			msg := err.Error()
			prefix := "--state-dir " + dir + ": " + c.path(dir) + " "
			if c.path(dir) == dir {
				prefix = "--state-dir " + dir + " "
			}
			if !strings.HasPrefix(msg, prefix) || !strings.Contains(msg, c.want) {
				t.Errorf("error %q, want it to name %s and say %q", msg, c.path(dir), c.want)
			}
			t.Log(msg)
		})
	}

	t.Run("parent owned by another user", func(t *testing.T) {
		parent := filepath.Join(t.TempDir(), "theirs")
		if err := chown(parent, uid, gid, 0o755); err != nil {
			t.Fatal(err)
		}
		dir := filepath.Join(parent, "state")
		if err := mkdir(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		_, err := prepareStateDir(dir)
		if err == nil || !strings.Contains(err.Error(), "the directory "+parent+" above it is owned by uid "+strconv.Itoa(uid)) {
			t.Errorf("error %v", err)
		}
	})

	// A link is resolved once: the node works on its target, so swapping
	// the link later changes nothing; a target of another user is refused.
	t.Run("symbolic links", func(t *testing.T) {
		good := t.TempDir()
		link := filepath.Join(t.TempDir(), "link")
		if err := os.Symlink(good, link); err != nil {
			t.Fatal(err)
		}
		got, err := prepareStateDir(link)
		if err != nil || got != good {
			t.Fatalf("prepareStateDir(link to own dir) = %q, %v; want %q", got, err, good)
		}
		theirs := filepath.Join(t.TempDir(), "theirs")
		if err := chown(theirs, uid, gid, 0o700); err != nil {
			t.Fatal(err)
		}
		bad := filepath.Join(t.TempDir(), "bad")
		if err := os.Symlink(theirs, bad); err != nil {
			t.Fatal(err)
		}
		if _, err := prepareStateDir(bad); err == nil || !strings.Contains(err.Error(), theirs+" is owned by uid") {
			t.Errorf("link to another user's dir: %v", err)
		}
	})
}

func same(dir string) string { return dir }

func sub(name string) func(string) string {
	return func(dir string) string { return filepath.Join(dir, name) }
}

// mkdir makes a directory with exactly mode, whatever the umask.
func mkdir(path string, mode os.FileMode) error {
	if err := os.Mkdir(path, mode); err != nil {
		return err
	}
	return os.Chmod(path, mode)
}

func chown(path string, uid, gid int, mode os.FileMode) error {
	if err := os.MkdirAll(path, mode); err != nil {
		return err
	}
	if err := os.Chmod(path, mode); err != nil {
		return err
	}
	return os.Chown(path, uid, gid)
}
