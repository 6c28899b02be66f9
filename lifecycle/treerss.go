package lifecycle

import (
	"bytes"
	"os"
	"strconv"
)

// TreeRSS returns the resident memory of pid and all its descendants, in
// bytes: a worker's memory limit is about the interpreter and whatever it
// started, not the interpreter alone. A root that is the init of a PID
// namespace (ModePIDNS: the process the node started runs the worker as
// its child) does not count itself: it is pyfleet's, not the worker's.
func TreeRSS(pid int) (uint64, error) {
	stats, err := scanStats()
	if err != nil {
		return 0, err
	}
	return treeRSS(stats, pid)
}

// TreeRSSOf returns, for each pid in roots that still runs, the resident
// memory of it and all its descendants, from one scan of /proc: checking a
// hundred workers costs one scan, not a hundred.
func TreeRSSOf(roots []int) (map[int]uint64, error) {
	stats, err := scanStats()
	if err != nil {
		return nil, err
	}
	out := make(map[int]uint64, len(roots))
	for _, root := range roots {
		// A zombie root reads as 0: it no longer runs.
		if rss, err := treeRSS(stats, root); err == nil && rss > 0 {
			out[root] = rss
		}
	}
	return out, nil
}

func treeRSS(stats []procStat, root int) (uint64, error) {
	var total uint64
	for i, pid := range descendants(stats, root) {
		rss, err := readRSS(pid)
		if err != nil {
			if i == 0 {
				return 0, err // the root itself is gone
			}
			continue // exited during the walk
		}
		if i == 0 && rss > 0 && isNamespaceInit(pid) {
			continue
		}
		total += rss
	}
	return total, nil
}

// isNamespaceInit reports whether pid is PID 1 of a PID namespace below
// the node's: a worker's init. No process can make itself that (a new PID
// namespace takes only the children forked after it), so a worker cannot
// pass for one.
func isNamespaceInit(pid int) bool {
	status, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return false
	}
	_, rest, ok := bytes.Cut(status, []byte("\nNSpid:"))
	if !ok {
		return false
	}
	line, _, _ := bytes.Cut(rest, []byte("\n"))
	f := bytes.Fields(line)
	return len(f) > 1 && string(f[len(f)-1]) == "1"
}
