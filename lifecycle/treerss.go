package lifecycle

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
		var total uint64
		for i, pid := range descendants(stats, root) {
			rss, err := readRSS(pid)
			if err != nil {
				if i == 0 {
					break // the root itself is gone
				}
				continue
			}
			total += rss
		}
		if total > 0 {
			out[root] = total
		}
	}
	return out, nil
}
