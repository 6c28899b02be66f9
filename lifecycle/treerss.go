package lifecycle

// TreeRSS returns the resident memory of pid and all its descendants, in
// bytes: a worker's memory limit is about the interpreter and whatever it
// started, not the interpreter alone.
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
		total += rss
	}
	return total, nil
}
