package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// ownCgroup is the harness's cgroup v2 directory, where a node it starts
// (in the same cgroup) makes its runs' cgroups, pyfleet.<node>.<run>
// (lifecycle/cgroup.go); "" without a cgroup2 mount. The mount is read from
// mountinfo, not assumed: on a hybrid host it is /sys/fs/cgroup/unified.
func ownCgroup() string {
	own := ""
	b, _ := os.ReadFile("/proc/self/cgroup")
	for _, line := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(line, "0::"); ok {
			own = p
		}
	}
	if own == "" {
		return ""
	}
	mi, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return ""
	}
	defer mi.Close()
	sc := bufio.NewScanner(mi)
	for sc.Scan() {
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		f, g := strings.Fields(pre), strings.Fields(post)
		if ok && len(f) >= 5 && len(g) >= 1 && g[0] == "cgroup2" && f[3] == "/" {
			return filepath.Join(f[4], own)
		}
	}
	return ""
}

// runCgroups lists the cgroups of the harness's nodes whose names start
// with prefix (a node name, or h.id for all of them).
func runCgroups(prefix string) []string {
	dir := ownCgroup()
	if dir == "" {
		return nil
	}
	ents, _ := os.ReadDir(dir)
	var out []string
	for _, e := range ents {
		if e.IsDir() && strings.HasPrefix(e.Name(), "pyfleet."+prefix) {
			out = append(out, filepath.Join(dir, e.Name()))
		}
	}
	return out
}

// removeCgroups kills whatever is in each cgroup tree and removes it,
// children first.
func removeCgroups(dirs []string) error {
	var errs []error
	for _, dir := range dirs {
		var tree []string
		_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				tree = append(tree, p)
			}
			return nil
		})
		_ = os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0)
		for end := time.Now().Add(5 * time.Second); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
			ev, _ := os.ReadFile(filepath.Join(dir, "cgroup.events"))
			if !bytes.Contains(ev, []byte("populated 1")) {
				break
			}
		}
		for _, d := range slices.Backward(tree) {
			if err := os.Remove(d); err != nil && !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, fmt.Errorf("remove cgroup %s: %w", d, err))
			}
		}
	}
	return errors.Join(errs...)
}
