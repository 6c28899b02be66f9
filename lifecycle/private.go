package lifecycle

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
)

// The files of a state dir decide what the Reaper kills: a registry record
// names a process by pid, start time and boot id, and all three can be read
// from /proc for anyone's process. So a record is trusted only because no
// other user could have written it: the registry and the lock files must be
// files of this user that nobody else can write.
//
// The rule for one of them (securePrivateFile):
//   - owned by another user, or not a regular file (a symbolic link could
//     point anywhere): refused;
//   - writable by group or others: refused, not fixed: anyone could have
//     written it, so its contents cannot be trusted; the operator checks it
//     and removes it (or chmods it 600);
//   - readable by group or others: fixed (chmod 600): what it says is still
//     ours, it only showed our pids.
//
// Files this package creates are 0600 already (bbolt's mode, os.CreateTemp).

// securePrivateFile applies the rule above to path; a missing file is fine.
func securePrivateFile(path string) error {
	st, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("%w: %s: %w", ErrNotPrivate, path, err)
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("%w: %s is not a regular file (%s)", ErrNotPrivate, path, st.Mode().Type())
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok && int(sys.Uid) != os.Geteuid() {
		return fmt.Errorf("%w: %s is owned by uid %d, not by this user (uid %d)", ErrNotPrivate, path, sys.Uid, os.Geteuid())
	}
	perm := st.Mode().Perm()
	if perm&0o022 != 0 {
		return fmt.Errorf("%w: %s is writable by group or others (mode %04o), so what it says cannot be trusted; check it, then remove it or chmod 600 it", ErrNotPrivate, path, perm)
	}
	if perm&0o077 != 0 {
		if err := os.Chmod(path, 0o600); err != nil {
			return fmt.Errorf("%w: %s: %w", ErrNotPrivate, path, err)
		}
	}
	return nil
}

// secureNodeFiles applies securePrivateFile to every file in the state
// dir's nodes directory: lock files, tombstones, guardian journals.
func secureNodeFiles(stateDir string) error {
	entries, err := os.ReadDir(nodesDir(stateDir))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("lifecycle: %w", err)
	}
	var errs []error
	for _, e := range entries {
		errs = append(errs, securePrivateFile(filepath.Join(nodesDir(stateDir), e.Name())))
	}
	return errors.Join(errs...)
}
