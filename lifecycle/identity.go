package lifecycle

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

// Identity names one process for as long as the machine runs. A pid alone is
// not enough: pid_max can be as low as 32768 and pids are reused, so a pid
// recorded yesterday may now belong to someone else's process. The start time
// tells two holders of one pid apart, and the boot id tells a pid from before
// a reboot apart from the same pid and start time after it.
type Identity struct {
	PID       int
	StartTime uint64 // clock ticks since boot: /proc/<pid>/stat field 22
	BootID    string
}

// Alive reports whether the process named by id is running now: the pid
// exists with the same start time on the same boot and is not a zombie (a
// zombie has exited; only its exit status waits to be collected).
func (id Identity) Alive() bool {
	if id.PID <= 0 {
		return false
	}
	boot, err := BootID()
	if err != nil || boot != id.BootID {
		return false
	}
	st, err := readStat(id.PID)
	if err != nil {
		return false
	}
	return st.startTime == id.StartTime && !st.exited()
}

func (id Identity) String() string {
	return fmt.Sprintf("pid %d (start %d, boot %s)", id.PID, id.StartTime, id.BootID)
}

// ReadIdentity returns the identity of the process that holds pid now.
func ReadIdentity(pid int) (Identity, error) {
	boot, err := BootID()
	if err != nil {
		return Identity{}, err
	}
	st, err := readStat(pid)
	if err != nil {
		return Identity{}, err
	}
	return Identity{PID: pid, StartTime: st.startTime, BootID: boot}, nil
}

// bootID is a cache: the boot id cannot change while this process runs.
var bootID = sync.OnceValues(func() (string, error) {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return "", fmt.Errorf("lifecycle: read boot id: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
})

// BootID returns this boot's id from /proc/sys/kernel/random/boot_id.
func BootID() (string, error) { return bootID() }

// procStat holds the fields of /proc/<pid>/stat this package uses.
type procStat struct {
	pid       int
	state     byte
	ppid      int
	pgrp      int
	session   int
	startTime uint64
}

// exited reports a zombie ('Z') or a process being torn down ('X').
func (s procStat) exited() bool { return s.state == 'Z' || s.state == 'X' }

func readStat(pid int) (procStat, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ESRCH) {
			return procStat{}, fmt.Errorf("%w: pid %d", ErrNoProcess, pid)
		}
		return procStat{}, fmt.Errorf("lifecycle: pid %d: %w", pid, err)
	}
	st, err := parseStat(b)
	if err != nil {
		return procStat{}, fmt.Errorf("pid %d: %w", pid, err)
	}
	return st, nil
}

// parseStat parses a /proc/<pid>/stat line. The command name (field 2) sits
// in parentheses and may itself contain spaces and ')', so the fixed fields
// are counted from the last ')'.
func parseStat(b []byte) (procStat, error) {
	open := bytes.IndexByte(b, '(')
	end := bytes.LastIndexByte(b, ')')
	if open < 0 || end < open {
		return procStat{}, ErrBadProcStat
	}
	pid, err := strconv.Atoi(string(bytes.TrimSpace(b[:open])))
	if err != nil {
		return procStat{}, fmt.Errorf("%w: pid: %w", ErrBadProcStat, err)
	}
	// f[0] is field 3 (state), so field n is f[n-3].
	f := strings.Fields(string(b[end+1:]))
	if len(f) < 20 || len(f[0]) != 1 {
		return procStat{}, ErrBadProcStat
	}
	st := procStat{pid: pid, state: f[0][0]}
	for _, p := range []struct {
		dst   *int
		field int
	}{{&st.ppid, 4}, {&st.pgrp, 5}, {&st.session, 6}} {
		if *p.dst, err = strconv.Atoi(f[p.field-3]); err != nil {
			return procStat{}, fmt.Errorf("%w: field %d: %w", ErrBadProcStat, p.field, err)
		}
	}
	if st.startTime, err = strconv.ParseUint(f[22-3], 10, 64); err != nil {
		return procStat{}, fmt.Errorf("%w: field 22: %w", ErrBadProcStat, err)
	}
	return st, nil
}
