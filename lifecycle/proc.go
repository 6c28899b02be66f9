package lifecycle

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
)

// listPids returns the pids of every process in /proc at the time of the call.
func listPids() ([]int, error) {
	d, err := os.Open("/proc")
	if err != nil {
		return nil, fmt.Errorf("lifecycle: %w", err)
	}
	defer d.Close()
	names, err := d.Readdirnames(-1)
	if err != nil {
		return nil, fmt.Errorf("lifecycle: list /proc: %w", err)
	}
	pids := make([]int, 0, len(names))
	for _, n := range names {
		if pid, err := strconv.Atoi(n); err == nil && pid > 0 {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

// scanStats reads the stat of every process; processes that exit during the
// scan are left out.
func scanStats() ([]procStat, error) {
	pids, err := listPids()
	if err != nil {
		return nil, err
	}
	stats := make([]procStat, 0, len(pids))
	for _, pid := range pids {
		if st, err := readStat(pid); err == nil {
			stats = append(stats, st)
		}
	}
	return stats, nil
}

// descendants returns root and every process below it by parent links, root
// first. A descendant that was re-parented (its parent died) is no longer
// below root and is not returned.
func descendants(stats []procStat, root int) []int {
	children := make(map[int][]int, len(stats))
	for _, st := range stats {
		children[st.ppid] = append(children[st.ppid], st.pid)
	}
	out := []int{root}
	for i := 0; i < len(out); i++ {
		out = append(out, children[out[i]]...)
	}
	return out
}

var pageSize = uint64(os.Getpagesize())

// readRSS reads the resident set size from /proc/<pid>/statm, whose second
// field equals VmRSS in pages and is cheaper to parse than /proc/<pid>/status.
func readRSS(pid int) (uint64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/statm")
	if err != nil {
		return 0, fmt.Errorf("%w: pid %d: %w", ErrNoProcess, pid, err)
	}
	f := bytes.Fields(b)
	if len(f) < 2 {
		return 0, fmt.Errorf("%w: pid %d statm", ErrBadProcStat, pid)
	}
	pages, err := strconv.ParseUint(string(f[1]), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%w: pid %d statm: %w", ErrBadProcStat, pid, err)
	}
	return pages * pageSize, nil
}
