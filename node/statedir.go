package node

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// The state dir tells the reaper what to kill: registry records name
// processes by pid, start time and boot id, which anyone can read from /proc
// for any process, and lock files say which runs are over. A directory
// another local user can write to (a --state-dir /tmp/x they made first, or
// one left group- or world-writable) would let them forge a record and have
// this node kill a process of their choosing with this node's rights. So:
//
//   - the state dir is created 0700 when it is missing;
//   - it, and the subdirectories a node uses (nodes/, run/, jetstream/)
//     where they exist, must be directories (not symbolic links) owned by
//     this user and not writable by group or others; 0755 (what earlier
//     versions created) is fine;
//   - every directory above it must belong to this user or to root, since
//     the owner of a parent can rename the state dir and put another in its
//     place;
//   - symbolic links in the path are resolved once, here, and the node uses
//     the resolved path from then on, so swapping a link later changes
//     nothing.
//
// Anything else refuses the start (exit 2) with the path and the problem.
// The files in it (registry.db, nodes/*) are checked by lifecycle when it
// opens them (lifecycle.ErrNotPrivate).

// stateSubdirs are the subdirectories of the state dir a node uses.
var stateSubdirs = []string{"nodes", "run", "jetstream"}

// prepareStateDir creates the state dir if it is missing, checks it as
// described above, and returns the path to use: dir with its symbolic links
// resolved.
func prepareStateDir(dir string) (string, error) {
	bad := func(format string, args ...any) error {
		msg := fmt.Sprintf(format, args...)
		if strings.HasPrefix(msg, dir+" ") {
			return errors.New("--state-dir " + msg) // names the dir already
		}
		return fmt.Errorf("--state-dir %s: %s", dir, msg)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", bad("%v", err)
	}
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return "", bad("%v", err)
	}
	if real, err = filepath.Abs(real); err != nil {
		return "", bad("%v", err)
	}
	if err := checkPrivateDir(real); err != nil {
		return "", bad("%v", err)
	}
	for _, sub := range stateSubdirs {
		err := checkPrivateDir(filepath.Join(real, sub))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return "", bad("%v", err)
		}
	}
	for p := filepath.Dir(real); ; p = filepath.Dir(p) {
		st, err := os.Lstat(p)
		if err != nil {
			return "", bad("%v", err)
		}
		if uid := ownerOf(st); uid != 0 && uid != os.Geteuid() {
			return "", bad("the directory %s above it is owned by uid %d, who could replace the state dir; use a state dir whose parents belong to you or root", p, uid)
		}
		if p == filepath.Dir(p) {
			break
		}
	}
	return real, nil
}

// checkPrivateDir checks that path is a directory of this user that nobody
// else can write to.
func checkPrivateDir(path string) error {
	st, err := os.Lstat(path)
	if err != nil {
		return err
	}
	if st.Mode()&fs.ModeSymlink != 0 {
		return fmt.Errorf("%s is a symbolic link, not a directory", path)
	}
	if !st.IsDir() {
		return fmt.Errorf("%s is not a directory", path)
	}
	if uid := ownerOf(st); uid != os.Geteuid() {
		return fmt.Errorf("%s is owned by uid %d, not by this user (uid %d): another user's directory could feed the reaper forged records; use a directory of your own", path, uid, os.Geteuid())
	}
	perm := st.Mode().Perm()
	switch {
	case perm&0o020 != 0:
		return fmt.Errorf("%s is writable by its group (mode %04o): other users could feed the reaper forged records; chmod go-w it (0700 or 0755)", path, perm)
	case perm&0o002 != 0:
		return fmt.Errorf("%s is writable by everyone (mode %04o): other users could feed the reaper forged records; chmod go-w it (0700 or 0755)", path, perm)
	}
	return nil
}

func ownerOf(st fs.FileInfo) int {
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		return int(sys.Uid)
	}
	return -1
}
