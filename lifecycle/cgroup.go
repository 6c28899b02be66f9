package lifecycle

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// ModeCgroup keeps each worker start in a cgroup v2 of its own, laid out
// under the node's own cgroup N (the 0:: line of /proc/self/cgroup, below
// the cgroup2 mount that /proc/self/mountinfo names; hybrid hosts mount it
// beside the v1 controllers, so no path is assumed):
//
//	N/pyfleet.<node>.<run>/           the run's cgroup; holds no process itself
//	N/pyfleet.<node>.<run>/<worker>/  one per worker start (Marker.Worker, e.g. w3-17)
//
// Every worker is forked straight into its cgroup (CLONE_INTO_CGROUP), so
// there is no moment at which it, or anything it starts, is outside it;
// no process can leave a cgroup without write access to a cgroup.procs
// outside it, whatever its environment, session or parent. Ending a
// worker is cgroup.kill on its cgroup; the guardian's sweep, and a later
// node's sweep of a dead run, are cgroup.kill on the run's.
//
// Why under N: N is the one part of the tree that is the node's to write
// (the root's when run as root, a systemd unit's with Delegate=yes, a
// container's with its own cgroup namespace). cgroup v2's no-internal-process
// rule says a cgroup that holds processes cannot pass a domain controller
// (memory) to its children, unless it is the root; it does not stop such a
// cgroup from having children with processes. N holds the node and its
// guardian, so the run's cgroup can live in N, but the memory controller
// reaches the workers only if N already passes it down (N is the root, in
// practice). pyfleet never writes N's own files: a controller N does not
// pass down is reported unavailable, saying why, and --max-memory then sums
// RSS. (The way out, the node moving itself into a leaf so that N holds no
// process, is not taken: a node cannot remove its own cgroup as it exits,
// nor move back into N once N passes a domain controller down.)

// cgroupRunPrefix starts the name of every run's cgroup.
const cgroupRunPrefix = "pyfleet."

// cgroupRunName is the name of run m's cgroup. Node and run names hold no
// '.', so the name parses back (parseCgroupRunName).
func cgroupRunName(m Marker) string { return cgroupRunPrefix + m.Node + "." + m.Run }

func parseCgroupRunName(name string) (Marker, bool) {
	rest, ok := strings.CutPrefix(name, cgroupRunPrefix)
	if !ok {
		return Marker{}, false
	}
	node, run, ok := strings.Cut(rest, ".")
	if !ok || !validName(node) || !validName(run) {
		return Marker{}, false
	}
	return Marker{Node: node, Run: run}, true
}

// cgroupMount is one cgroup2 mount: root is the cgroup mounted (as seen
// from this process's cgroup namespace), point where.
type cgroupMount struct{ root, point string }

// cgroup2Mounts lists the cgroup2 mounts in a /proc/<pid>/mountinfo.
// Fields: id, parent, major:minor, root, mount point, options, optional
// fields up to a lone "-", then the file system type.
func cgroup2Mounts(mountinfo []byte) []cgroupMount {
	var out []cgroupMount
	for line := range strings.Lines(string(mountinfo)) {
		f := strings.Fields(line)
		sep := slices.Index(f, "-")
		if sep < 6 || sep+1 >= len(f) || f[sep+1] != "cgroup2" {
			continue
		}
		out = append(out, cgroupMount{root: unescapeMountinfo(f[3]), point: unescapeMountinfo(f[4])})
	}
	return out
}

// unescapeMountinfo undoes mountinfo's octal escapes (\040 is a space).
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// ownCgroup is the cgroup v2 path in a /proc/<pid>/cgroup: its "0::" line.
func ownCgroup(procCgroup []byte) (string, error) {
	for line := range strings.Lines(string(procCgroup)) {
		if path, ok := strings.CutPrefix(strings.TrimRight(line, "\n"), "0::"); ok {
			if !strings.HasPrefix(path, "/") || strings.HasSuffix(path, " (deleted)") {
				return "", fmt.Errorf("the cgroup v2 line of /proc/self/cgroup is %q", line)
			}
			return path, nil
		}
	}
	return "", errors.New("/proc/self/cgroup has no cgroup v2 (0::) line")
}

// locateCgroup returns the mount point of the cgroup2 mount holding the
// cgroup at path, and that cgroup's directory.
func locateCgroup(mounts []cgroupMount, path string) (mount, dir string, err error) {
	for _, m := range mounts {
		rel := ""
		switch {
		case m.root == "/":
			rel = path
		case path == m.root:
		case strings.HasPrefix(path, m.root+"/"):
			rel = path[len(m.root):]
		default:
			continue
		}
		return m.point, filepath.Join(m.point, rel), nil
	}
	return "", "", fmt.Errorf("no cgroup2 mount shows the node's cgroup %s", path)
}

// isCgroup2 reports whether dir is on a cgroup2 file system.
func isCgroup2(dir string) bool {
	var st unix.Statfs_t
	return unix.Statfs(dir, &st) == nil && st.Type == unix.CGROUP2_SUPER_MAGIC
}

// cgroupContainment is ModeCgroup for one run.
type cgroupContainment struct {
	marker  Marker // the run
	mount   string // the cgroup2 mount point
	nodeDir string // the node's own cgroup
	runDir  string // nodeDir/pyfleet.<node>.<run>
	// ctrl holds the controllers the workers' cgroups get; why says, for
	// each of memory and pids that they do not, why not.
	ctrl map[string]bool
	why  map[string]error
	// ns, when the host allows it, also runs each worker in a PID
	// namespace of its own inside its cgroup: a cgroup outlives every
	// process that could kill it (node and guardian SIGKILLed together),
	// a PID namespace dies with its init, whose parent-death signal is
	// the node's death. nsWhy says why ns is nil.
	ns    *pidnsContainment
	nsWhy error
}

// NewCgroupContainment returns ModeCgroup for run m (m.Worker empty), and
// creates the run's cgroup. The error wraps ErrContainmentUnavailable, and
// says why, when the host has no cgroup v2 the node can write below its own
// cgroup. The run's cgroup is removed by the run's guardian when the node
// stops (see StartGuardian), or by a later node's Reaper if both died.
func NewCgroupContainment(m Marker) (Containment, error) {
	if m.Worker != "" || !validName(m.Node) || !validName(m.Run) {
		return nil, fmt.Errorf("%w: a containment keeps a whole run, not %+v", ErrInvalidName, m)
	}
	mountinfo, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("%w: cgroup: %v", ErrContainmentUnavailable, err)
	}
	mounts := cgroup2Mounts(mountinfo)
	if len(mounts) == 0 {
		return nil, fmt.Errorf("%w: cgroup: no cgroup2 file system is mounted (/proc/self/mountinfo)", ErrContainmentUnavailable)
	}
	self, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return nil, fmt.Errorf("%w: cgroup: %v", ErrContainmentUnavailable, err)
	}
	path, err := ownCgroup(self)
	if err != nil {
		return nil, fmt.Errorf("%w: cgroup: %v", ErrContainmentUnavailable, err)
	}
	mount, dir, err := locateCgroup(mounts, path)
	if err != nil {
		return nil, fmt.Errorf("%w: cgroup: %v", ErrContainmentUnavailable, err)
	}
	c, err := newCgroupContainment(m, mount, dir)
	if err != nil {
		return nil, err
	}
	ns, err := NewPIDNSContainment(m)
	if err != nil {
		c.nsWhy = err
	} else {
		c.ns = ns.(*pidnsContainment)
	}
	return c, nil
}

func newCgroupContainment(m Marker, mount, nodeDir string) (*cgroupContainment, error) {
	unavailable := func(format string, args ...any) error {
		return fmt.Errorf("%w: cgroup: "+format, append([]any{ErrContainmentUnavailable}, args...)...)
	}
	if !isCgroup2(nodeDir) {
		return nil, unavailable("the node's cgroup %s is not on a cgroup2 file system", nodeDir)
	}
	c := &cgroupContainment{marker: m, mount: mount, nodeDir: nodeDir, runDir: filepath.Join(nodeDir, cgroupRunName(m))}
	if err := os.Mkdir(c.runDir, 0o755); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return nil, fmt.Errorf("%w: cgroup %s exists", ErrRunTaken, c.runDir)
		}
		return nil, unavailable("cannot create a cgroup in the node's own cgroup %s (%v): that subtree must be this user's, "+
			"as it is for root, in a systemd unit with Delegate=yes, or in a container with its own cgroup namespace", nodeDir, err)
	}
	if _, err := os.Stat(filepath.Join(c.runDir, "cgroup.kill")); err != nil {
		_ = os.Remove(c.runDir)
		return nil, unavailable("%s has no cgroup.kill (Linux 5.14 or later is needed)", c.runDir)
	}
	// Putting a process into a cgroup (CLONE_INTO_CGROUP too) needs write
	// access to cgroup.procs of the nearest cgroup above both where it is
	// and where it goes: the node's own.
	if err := unix.Access(filepath.Join(nodeDir, "cgroup.procs"), unix.W_OK); err != nil {
		_ = os.Remove(c.runDir)
		return nil, unavailable("cannot move processes below the node's own cgroup %s: %s/cgroup.procs: %v", nodeDir, nodeDir, err)
	}
	c.setupControllers()
	return c, nil
}

// cgroupControllers are the controllers the workers' cgroups may use.
var cgroupControllers = []string{"memory", "pids"}

// setupControllers gives the run's cgroup's children each controller that
// the node's cgroup passes down, and records why the others are missing.
func (c *cgroupContainment) setupControllers() {
	c.ctrl, c.why = map[string]bool{}, map[string]error{}
	avail := readFields(filepath.Join(c.nodeDir, "cgroup.controllers"))
	passed := readFields(filepath.Join(c.nodeDir, "cgroup.subtree_control"))
	for _, name := range cgroupControllers {
		switch {
		case !slices.Contains(avail, name):
			c.why[name] = fmt.Errorf("%w: the %s controller is not available at %s (cgroup v2 there has: %s)",
				ErrContainmentUnavailable, name, c.nodeDir, listOrNone(avail))
		case !slices.Contains(passed, name):
			c.why[name] = fmt.Errorf("%w: the %s controller is available at %s but not passed to its children "+
				"(its cgroup.subtree_control has: %s); pyfleet does not change the node's own cgroup, and cgroup v2 lets a cgroup "+
				"that holds processes (this one holds the node) pass memory down only if it is the root",
				ErrContainmentUnavailable, name, c.nodeDir, listOrNone(passed))
		default:
			// The run's cgroup holds no process, so the rule above allows it.
			if err := writeCgroupFile(c.runDir, "cgroup.subtree_control", "+"+name); err != nil {
				c.why[name] = fmt.Errorf("%w: the %s controller: %v", ErrContainmentUnavailable, name, err)
				continue
			}
			c.ctrl[name] = true
		}
	}
}

func listOrNone(names []string) string {
	if len(names) == 0 {
		return "none"
	}
	return strings.Join(names, " ")
}

// readFields reads a file of space-separated words (cgroup.controllers).
func readFields(path string) []string {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	return strings.Fields(string(b))
}

func (c *cgroupContainment) Mode() string { return ModeCgroup }

// PIDNamespaces is nil when each worker also runs in a PID namespace of its
// own (see ModeCgroup), else why it does not.
func (c *cgroupContainment) PIDNamespaces() error {
	if c.ns == nil && c.nsWhy == nil {
		return errors.New("not asked for")
	}
	return c.nsWhy
}

// RunCgroup is the directory of the run's cgroup.
func (c *cgroupContainment) RunCgroup() string { return c.runDir }

// Close removes the run's cgroup, which must be empty by then: call it
// once every worker of the run is gone. The run's guardian, which kills
// what is left as it stops, normally removed it already; Close covers a
// node that ends before it started its guardian.
func (c *cgroupContainment) Close() error { return removeCgroupTree(c.runDir) }

// CheckLimits says whether the workers' cgroups have the controllers lim needs.
func (c *cgroupContainment) CheckLimits(lim Limits) error {
	var errs []error
	if lim.Memory > 0 && !c.ctrl["memory"] {
		errs = append(errs, c.why["memory"])
	}
	if lim.Pids > 0 && !c.ctrl["pids"] {
		errs = append(errs, c.why["pids"])
	}
	return errors.Join(errs...)
}

func (c *cgroupContainment) Prepare(cmd *exec.Cmd, m Marker) (Container, error) {
	return c.PrepareLimited(cmd, m, Limits{})
}

// PrepareLimited creates the cgroup of worker start m, sets lim on it, and
// has cmd forked straight into it.
func (c *cgroupContainment) PrepareLimited(cmd *exec.Cmd, m Marker, lim Limits) (Container, error) {
	if err := c.CheckLimits(lim); err != nil {
		return nil, err
	}
	if m.Node != c.marker.Node || m.Run != c.marker.Run || !validName(m.Worker) {
		return nil, fmt.Errorf("%w: worker %+v is not of run %s", ErrInvalidName, m, c.marker.RunValue())
	}
	dir := filepath.Join(c.runDir, m.Worker)
	if err := os.Mkdir(dir, 0o755); err != nil {
		// A start of that name whose cgroup Release could not remove
		// (something in it would not die in time): reused only if empty.
		if !errors.Is(err, fs.ErrExist) || os.Remove(dir) != nil {
			return nil, fmt.Errorf("lifecycle: cgroup %s: %w", dir, err)
		}
		if err := os.Mkdir(dir, 0o755); err != nil {
			return nil, fmt.Errorf("lifecycle: cgroup %s: %w", dir, err)
		}
	}
	box := &cgroupContainer{dir: dir, fd: -1, memory: c.ctrl["memory"]}
	if err := box.limit(lim); err != nil {
		_ = os.Remove(dir)
		return nil, err
	}
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		_ = os.Remove(dir)
		return nil, fmt.Errorf("lifecycle: cgroup %s: %w", dir, err)
	}
	box.fd = fd
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.UseCgroupFD, cmd.SysProcAttr.CgroupFD = true, fd
	if c.ns == nil {
		return box, nil
	}
	ns, err := c.ns.Prepare(cmd, m)
	if err != nil {
		return nil, errors.Join(err, box.Release())
	}
	return &namespacedCgroup{cgroupContainer: box, pidnsContainer: ns.(*pidnsContainer)}, nil
}

// namespacedCgroup is a worker start's cgroup with its PID namespace in it
// (the init is the cgroup's first process). It accounts for memory as the
// cgroup does and reports the worker's exit as the init does.
type namespacedCgroup struct {
	*cgroupContainer
	*pidnsContainer
}

// Kill kills the cgroup, init and namespace with it.
func (b *namespacedCgroup) Kill() error { return b.cgroupContainer.Kill() }

func (b *namespacedCgroup) Release() error {
	return errors.Join(b.pidnsContainer.Release(), b.cgroupContainer.Release())
}

// cgroupContainer is one worker start's cgroup.
type cgroupContainer struct {
	dir    string
	memory bool // the memory controller is on

	mu sync.Mutex
	fd int // the cgroup's directory, for CLONE_INTO_CGROUP; -1 once closed
}

func (b *cgroupContainer) limit(lim Limits) error {
	if lim.Memory > 0 {
		if err := writeCgroupFile(b.dir, "memory.max", strconv.FormatUint(lim.Memory, 10)); err != nil {
			return err
		}
		// Past the limit the OOM killer ends the whole tree, the worker
		// with it (which is replaced: terminated, reason oom), rather than
		// whichever process is largest, which may leave a worker whose
		// call is gone.
		if err := writeCgroupFile(b.dir, "memory.oom.group", "1"); err != nil {
			return err
		}
		// With swap the tree would pass the limit slowly instead. The file
		// exists only where swap is accounted.
		if _, err := os.Stat(filepath.Join(b.dir, "memory.swap.max")); err == nil {
			if err := writeCgroupFile(b.dir, "memory.swap.max", "0"); err != nil {
				return err
			}
		}
	}
	if lim.Pids > 0 {
		if err := writeCgroupFile(b.dir, "pids.max", strconv.Itoa(lim.Pids)); err != nil {
			return err
		}
	}
	return nil
}

// Kill kills everything in the cgroup: every process in it, whatever it
// did to its environment, session or process group, and anything forking
// meanwhile (cgroup.kill is atomic against forks).
func (b *cgroupContainer) Kill() error {
	err := writeCgroupFile(b.dir, "cgroup.kill", "1")
	if errors.Is(err, fs.ErrNotExist) {
		return nil // released
	}
	return err
}

// Release waits (at most drainTimeout) for the cgroup to empty, then
// removes it. A cgroup that stays populated is left for the run's guardian
// or a later node's sweep.
func (b *cgroupContainer) Release() error {
	b.mu.Lock()
	if b.fd >= 0 {
		_ = unix.Close(b.fd)
		b.fd = -1
	}
	b.mu.Unlock()
	if err := waitUnpopulated(b.dir, drainTimeout); err != nil {
		return err
	}
	if err := os.Remove(b.dir); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("lifecycle: remove cgroup %s: %w", b.dir, err)
	}
	return nil
}

// Memory is memory.current, with the memory controller on.
func (b *cgroupContainer) Memory() (uint64, bool) {
	if !b.memory {
		return 0, false
	}
	return readCgroupUint(b.dir, "memory.current")
}

// OOMKills is memory.events' oom_kill.
func (b *cgroupContainer) OOMKills() int {
	if !b.memory {
		return 0
	}
	n, _ := readCgroupKey(b.dir, "memory.events", "oom_kill")
	return int(n)
}

// writeCgroupFile writes one value to a cgroup interface file (which must
// exist: O_CREAT would make a plain file on a fake tree, and hide a typo).
func writeCgroupFile(dir, name, value string) error {
	f, err := os.OpenFile(filepath.Join(dir, name), os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return fmt.Errorf("lifecycle: cgroup: %w", err)
	}
	_, err = f.WriteString(value)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("lifecycle: cgroup: write %q to %s: %w", value, filepath.Join(dir, name), err)
	}
	return nil
}

// readCgroupUint reads a file holding one number (memory.current).
func readCgroupUint(dir, name string) (uint64, bool) {
	b, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		return 0, false
	}
	n, err := strconv.ParseUint(string(bytes.TrimSpace(b)), 10, 64)
	return n, err == nil
}

// readCgroupKey reads the value of key in a flat keyed file
// (cgroup.events, memory.events: "key value" lines).
func readCgroupKey(dir, name, key string) (uint64, bool) {
	b, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		return 0, false
	}
	for line := range strings.Lines(string(b)) {
		k, v, ok := strings.Cut(strings.TrimSpace(line), " ")
		if ok && k == key {
			n, err := strconv.ParseUint(v, 10, 64)
			return n, err == nil
		}
	}
	return 0, false
}

// waitUnpopulated waits up to limit until no process is left in dir or
// below it (cgroup.events: populated 0). A cgroup already gone counts as
// empty.
func waitUnpopulated(dir string, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for pause := 200 * time.Microsecond; ; pause = min(2*pause, 20*time.Millisecond) {
		n, ok := readCgroupKey(dir, "cgroup.events", "populated")
		if !ok {
			if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return fmt.Errorf("lifecycle: cgroup %s: no populated key in cgroup.events", dir)
		}
		if n == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("lifecycle: cgroup %s still holds processes after %s", dir, limit)
		}
		time.Sleep(pause)
	}
}

// cgroupTree lists dir and every cgroup below it, parents first.
func cgroupTree(dir string) ([]string, error) {
	out := []string{dir}
	for i := 0; i < len(out); i++ {
		entries, err := os.ReadDir(out[i])
		if err != nil {
			if i > 0 && errors.Is(err, fs.ErrNotExist) {
				continue // removed meanwhile
			}
			return out, err
		}
		for _, e := range entries {
			if e.IsDir() {
				out = append(out, filepath.Join(out[i], e.Name()))
			}
		}
	}
	return out, nil
}

// cgroupProc is a process found in a run's cgroup, and the worker whose
// cgroup it was in ("" if it was in the run's cgroup itself).
type cgroupProc struct {
	pid    int
	worker string
}

// cgroupTreeProcs lists the processes in dir and below it.
func cgroupTreeProcs(dir string) ([]cgroupProc, error) {
	dirs, err := cgroupTree(dir)
	if err != nil {
		return nil, err
	}
	var out []cgroupProc
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join(d, "cgroup.procs"))
		if err != nil {
			continue
		}
		worker := ""
		if rel, err := filepath.Rel(dir, d); err == nil && rel != "." {
			worker, _, _ = strings.Cut(rel, string(filepath.Separator))
		}
		for f := range strings.FieldsSeq(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil && pid > 0 {
				out = append(out, cgroupProc{pid: pid, worker: worker})
			}
		}
	}
	return out, nil
}

// killCgroupTree kills everything in the cgroup dir of run m and below it
// (cgroup.kill works on the whole subtree), reports each process found
// there before the kill as orphan_reaped with detail, waits up to limit for
// the tree to empty, and removes dir and every cgroup below it. It returns
// how many processes it found. A dir that is gone is nothing to do.
func killCgroupTree(dir string, m Marker, detail string, events Events, limit time.Duration) (int, error) {
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	procs, err := cgroupTreeProcs(dir)
	if err != nil {
		return 0, fmt.Errorf("lifecycle: cgroup %s: %w", dir, err)
	}
	if err := writeCgroupFile(dir, "cgroup.kill", "1"); err != nil {
		return 0, err
	}
	for _, p := range procs {
		emit(events, Event{Kind: KindOrphanReaped, Node: m.Node, Run: m.Run, Worker: p.worker, PID: p.pid, Detail: detail})
	}
	if err := waitUnpopulated(dir, limit); err != nil {
		return len(procs), err
	}
	return len(procs), removeCgroupTree(dir)
}

// removeCgroupTree removes dir and the cgroups below it, children first.
func removeCgroupTree(dir string) error {
	dirs, err := cgroupTree(dir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("lifecycle: cgroup %s: %w", dir, err)
	}
	var errs []error
	for _, d := range slices.Backward(dirs) {
		if err := os.Remove(d); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("lifecycle: remove cgroup %s: %w", d, err))
		}
	}
	return errors.Join(errs...)
}

// A run's cgroup is recorded in the state dir, in
// nodes/<node>.<run>.cgroup (0600, like the lock files), so that a node
// started later in another cgroup (another login session, another unit)
// still finds the cgroup of a run that died with its guardian. The record
// only ever names a directory called pyfleet.<node>.<run> on a cgroup2
// file system (validRunCgroup): a record that says otherwise is ignored,
// so at worst it points at another cgroup of the same dead run.
const cgroupRecordSuffix = ".cgroup"

func cgroupRecordPath(stateDir string, m Marker) string {
	return filepath.Join(nodesDir(stateDir), m.Node+"."+m.Run+cgroupRecordSuffix)
}

// writeCgroupRecord records c's run cgroup, unless the record is there.
func writeCgroupRecord(stateDir string, c *cgroupContainment) error {
	path := cgroupRecordPath(stateDir, c.marker)
	if b, err := os.ReadFile(path); err == nil && strings.TrimSpace(string(b)) == c.runDir {
		return nil
	}
	if err := os.MkdirAll(nodesDir(stateDir), 0o700); err != nil {
		return fmt.Errorf("lifecycle: cgroup record: %w", err)
	}
	f, err := os.CreateTemp(nodesDir(stateDir), "."+c.marker.Node+"."+c.marker.Run+".*.tmp")
	if err != nil {
		return fmt.Errorf("lifecycle: cgroup record: %w", err)
	}
	_, err = f.WriteString(c.runDir + "\n")
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("lifecycle: cgroup record: %w", err)
	}
	return nil
}

// removeCgroupRecord removes run m's record, if any.
func removeCgroupRecord(stateDir string, m Marker) error {
	if err := os.Remove(cgroupRecordPath(stateDir, m)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("lifecycle: cgroup record: %w", err)
	}
	return nil
}

// dropStaleCgroupRecord removes run m's record if none of its cgroups
// exists any more.
func dropStaleCgroupRecord(stateDir string, m Marker, dirs []string) error {
	for _, dir := range dirs {
		if _, err := os.Stat(dir); err == nil {
			return nil
		}
	}
	return removeCgroupRecord(stateDir, m)
}

// validRunCgroup reports whether dir may be run m's cgroup.
func validRunCgroup(m Marker, dir string) bool {
	if !filepath.IsAbs(dir) || filepath.Clean(dir) != dir || filepath.Base(dir) != cgroupRunName(m) {
		return false
	}
	_, err := os.Stat(dir)
	return errors.Is(err, fs.ErrNotExist) || isCgroup2(dir)
}

// runCgroups finds the cgroups of runs: those recorded in the state dir,
// and, in ModeCgroup, those beside this run's own. The caller decides
// which runs are over.
func (r *Reaper) runCgroups() (map[Marker][]string, error) {
	out := map[Marker][]string{}
	add := func(m Marker, dir string) {
		if !slices.Contains(out[m], dir) {
			out[m] = append(out[m], dir)
		}
	}
	paths, err := filepath.Glob(filepath.Join(nodesDir(r.cfg.StateDir), "*"+cgroupRecordSuffix))
	if err != nil {
		return out, fmt.Errorf("lifecycle: cgroup records: %w", err)
	}
	var errs []error
	for _, path := range paths {
		base := strings.TrimSuffix(filepath.Base(path), cgroupRecordSuffix)
		node, run, ok := strings.Cut(base, ".")
		m := Marker{Node: node, Run: run}
		if !ok || !validName(node) || !validName(run) {
			continue
		}
		b, err := os.ReadFile(path)
		if err != nil {
			errs = append(errs, fmt.Errorf("lifecycle: cgroup record: %w", err))
			continue
		}
		dir := strings.TrimSpace(string(b))
		if !validRunCgroup(m, dir) {
			r.log.Warn("ignoring a cgroup record that does not name a cgroup of its run", zap.String("path", path), zap.String("cgroup", dir))
			continue
		}
		add(m, dir)
	}
	if r.cg != nil {
		entries, err := os.ReadDir(r.cg.nodeDir)
		if err != nil {
			errs = append(errs, fmt.Errorf("lifecycle: cgroup %s: %w", r.cg.nodeDir, err))
		}
		for _, e := range entries {
			if m, ok := parseCgroupRunName(e.Name()); ok && e.IsDir() {
				add(m, filepath.Join(r.cg.nodeDir, e.Name()))
			}
		}
	}
	return out, errors.Join(errs...)
}
