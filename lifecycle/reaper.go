package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// ReaperConfig configures a Reaper.
type ReaperConfig struct {
	StateDir string    // required: where the node locks are
	Registry *Registry // required
	// Spawner, if set, makes Run also reap the orphans this process adopted
	// as a child subreaper (Spawner.ReapAdopted) every AdoptInterval.
	Spawner *Spawner
	// Events receives an orphan_reaped event for every kill. May be nil.
	Events Events
	// Lock, if set, is the lock of the run this Reaper works for: that run
	// is never swept, and every Sweep first puts its lock file back if
	// someone removed it (NodeLock.Ensure).
	Lock *NodeLock
	// Interval between sweeps of the registry in Run; default 10 s, or
	// PYFLEET_REAPER_INTERVAL (a Go duration) if set. That variable is for
	// tests, which must see several sweeps without waiting minutes; it is
	// not a setting.
	Interval time.Duration
	// AdoptInterval between reaps of adopted orphans in Run; default 1 s.
	AdoptInterval time.Duration
	Logger        *zap.Logger // default: no logging
	// Containment, if it is ModeCgroup's (for the run of Lock), makes the
	// state dir record where the run's cgroup is, and every Sweep look for
	// the cgroups of dead runs (in its records, and beside this run's own
	// cgroup) and kill and remove them.
	Containment Containment
}

// envReaperInterval shortens the sweep interval, for tests only.
const envReaperInterval = "PYFLEET_REAPER_INTERVAL"

// Reaper finds and kills what dead runs left behind, on this state dir.
type Reaper struct {
	cfg ReaperConfig // its Events counts the sweeps' kills (countKill)
	log *zap.Logger
	// events is ReaperConfig.Events as given: what countKill passes each
	// event on to, and what reaps of adopted orphans report to, which are
	// not sweeps.
	events   Events
	running  atomic.Bool // Run has begun: sweeps from now on are periodic
	atStart  atomic.Int64
	periodic atomic.Int64
	cg       *cgroupContainment // nil unless ModeCgroup
}

// NewReaper validates cfg and returns a Reaper.
func NewReaper(cfg ReaperConfig) (*Reaper, error) {
	switch {
	case cfg.StateDir == "":
		return nil, errors.New("lifecycle: reaper: StateDir is required")
	case cfg.Registry == nil:
		return nil, errors.New("lifecycle: reaper: Registry is required")
	}
	if cfg.Interval <= 0 {
		cfg.Interval = 10 * time.Second
		if d, err := time.ParseDuration(os.Getenv(envReaperInterval)); err == nil && d > 0 {
			cfg.Interval = d
		}
	}
	if cfg.AdoptInterval <= 0 {
		cfg.AdoptInterval = time.Second
	}
	log := cfg.Logger
	if log == nil {
		log = zap.NewNop()
	}
	r := &Reaper{cfg: cfg, log: log.Named("reaper"), events: cfg.Events}
	r.cfg.Events = r.countKill
	if cg, ok := cfg.Containment.(*cgroupContainment); ok {
		if cfg.Lock == nil || cg.marker != cfg.Lock.Marker() {
			return nil, errors.New("lifecycle: reaper: a cgroup containment needs the Lock of its own run")
		}
		r.cg = cg
	}
	return r, nil
}

// Run sweeps every Interval (and reaps adopted orphans every AdoptInterval
// if a Spawner is configured) until ctx is done, then returns nil. Errors of
// single passes are logged, not returned: the next pass retries. Call Sweep
// once before Run, at node start, before any worker is spawned: Stats
// counts the kills of sweeps before Run as AtStart, the rest as Periodic.
func (r *Reaper) Run(ctx context.Context) error {
	r.running.Store(true)
	sweep := time.NewTicker(r.cfg.Interval)
	defer sweep.Stop()
	var adopt <-chan time.Time
	if r.cfg.Spawner != nil {
		t := time.NewTicker(r.cfg.AdoptInterval)
		defer t.Stop()
		adopt = t.C
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-sweep.C:
			if err := r.Sweep(); err != nil {
				r.log.Warn("sweep", zap.Error(err))
			}
		case <-adopt:
			if _, err := r.cfg.Spawner.ReapAdopted(r.events); err != nil && !errors.Is(err, ErrSpawnerClosed) {
				r.log.Warn("reap adopted orphans", zap.Error(err))
			}
		}
	}
}

// Sweep makes one pass over the state dir. For every run that is over:
//
//   - its cgroup, if it had one (ModeCgroup), is killed with everything in
//     it, whatever that did to its environment or session, and removed;
//   - each recorded worker whose identity (pid, start time, boot id) still
//     matches is killed with its process group;
//   - each process carrying the run's marker (EnvWorkerRun) is killed: this
//     finds what left the group (setsid, double fork);
//   - its records are deleted, and once a pass finds nothing left of it,
//     its lock file.
//
// A run is alive while some process holds its lock, or while the node
// process that wrote its records (Record.NodeIdentity) runs: a lock file
// removed or replaced under a live node does not make it look dead. The
// run of ReaperConfig.Lock is alive by definition, and its lock file is put
// back first if it is gone. Runs that are alive are left alone, except that
// records of their workers that are no longer running are deleted.
// Processes that carry the marker of a run this state dir has no trace of
// are never touched: they may belong to a node using another state dir.
// Every kill is reported as orphan_reaped.
func (r *Reaper) Sweep() error {
	var errs []error
	var self Marker
	if r.cfg.Lock != nil {
		self = r.cfg.Lock.Marker()
		restored, err := r.cfg.Lock.Ensure()
		if err != nil {
			errs = append(errs, err)
		} else if restored {
			r.log.Warn("the node's lock file was removed or replaced under it; put it back", zap.String("path", r.cfg.Lock.path))
		}
	}
	if r.cg != nil {
		errs = append(errs, writeCgroupRecord(r.cfg.StateDir, r.cg))
	}
	recs, err := r.cfg.Registry.List()
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	runs := make(map[Marker][]Record)
	for _, rec := range recs {
		m := Marker{Node: rec.Node, Run: rec.Run}
		runs[m] = append(runs[m], rec)
	}
	locked, err := lockedRuns(r.cfg.StateDir)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	for _, m := range locked {
		if _, ok := runs[m]; !ok {
			runs[m] = nil
		}
	}
	cgroups, err := r.runCgroups()
	errs = append(errs, err)
	for m, dirs := range cgroups {
		if _, ok := runs[m]; ok {
			continue
		}
		// No lock file and no registry record: this state dir cannot
		// tell whether the run is over (its cgroup may be another state
		// dir's node's, in the same cgroup), so it is left alone. Only a
		// record whose cgroup is gone is dropped.
		errs = append(errs, dropStaleCgroupRecord(r.cfg.StateDir, m, dirs))
		delete(cgroups, m)
	}

	for m, recs := range runs {
		if m == self || runAliveByRecords(r.cfg.StateDir, m, recs) {
			for _, rec := range recs {
				// The node replaces or deletes these itself; deleteIf
				// never removes a record it updated meanwhile.
				if rec.PID != 0 && !rec.Identity().Alive() {
					errs = append(errs, r.cfg.Registry.deleteIf(rec))
				}
			}
			continue
		}
		errs = append(errs, r.sweepDeadRun(m, recs, cgroups[m]))
	}
	return errors.Join(errs...)
}

// runAliveByRecords reports whether run m is alive: its lock is held, or a
// node process that wrote one of its records still runs. The second half
// is what keeps a live run alive when its lock file was removed (or
// replaced by an unlocked file) before its node noticed.
func runAliveByRecords(stateDir string, m Marker, recs []Record) bool {
	if runStateOf(stateDir, m.Node, m.Run) == runAlive {
		return true
	}
	for _, rec := range recs {
		if rec.NodeIdentity().Alive() {
			return true
		}
	}
	return false
}

func (r *Reaper) sweepDeadRun(m Marker, recs []Record, cgroups []string) error {
	events := r.cfg.Events
	if len(recs) > 0 && recs[0].Pool != "" && events != nil {
		pool := recs[0].Pool
		events = func(ev Event) {
			ev.Pool = pool
			r.cfg.Events(ev)
		}
	}
	// One event a process: a group member killed with its recorded
	// leader may still be exiting when the marker scan below finds it.
	reported := map[int]bool{}
	each := events
	events = func(ev Event) {
		if ev.Kind == KindOrphanReaped {
			if reported[ev.PID] {
				return
			}
			reported[ev.PID] = true
		}
		emit(each, ev)
	}
	found := 0
	var errs []error
	run := m.RunValue()
	// First: it takes everything in it at once, with whatever dropped
	// the marker, and what it took the steps below do not find again.
	for _, dir := range cgroups {
		n, err := killCgroupTree(dir, m, "in the cgroup of dead run "+run, events, 2*time.Second)
		found += n
		errs = append(errs, err)
	}
	if len(cgroups) > 0 && errors.Join(errs...) == nil {
		errs = append(errs, removeCgroupRecord(r.cfg.StateDir, m))
	}
	for _, rec := range recs {
		n, err := killRecorded(rec, events)
		found += n
		errs = append(errs, err)
	}
	n, err := killMarked(func(_ int, k marks) bool { return k.run == run }, "carried the marker of dead run "+run, events)
	found += n
	errs = append(errs, err)
	if err := errors.Join(errs...); err != nil {
		return err // records and tombstone stay for the next pass
	}
	for _, rec := range recs {
		errs = append(errs, r.cfg.Registry.deleteIf(rec))
	}
	if found > 0 {
		r.log.Info("reaped a dead run", zap.String("node", m.Node), zap.String("run", m.Run), zap.Int("killed", len(reported)))
	} else {
		// Nothing left: the tombstone has done its job. With something
		// found, the next pass checks that nothing was missed first.
		errs = append(errs, removeTombstone(r.cfg.StateDir, m.Node, m.Run))
	}
	return errors.Join(errs...)
}

// killRecorded kills a recorded worker of a dead run and its process group,
// if the recorded identity still matches a running process, and reports how
// many processes it killed.
func killRecorded(rec Record, events Events) (int, error) {
	id := rec.Identity()
	if id.PID <= 0 {
		return 0, nil
	}
	// The pidfd pins the process that holds the pid now; checking the
	// identity after opening it proves that process is the recorded one
	// (or that it has died, and then no signal through the pidfd lands).
	fd, err := unix.PidfdOpen(id.PID, 0)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			return 0, nil
		}
		return 0, fmt.Errorf("lifecycle: pidfd_open %d: %w", id.PID, err)
	}
	defer unix.Close(fd)
	if !id.Alive() {
		return 0, nil
	}
	// Stopped, the leader cannot exit by itself while its group is
	// signalled, and while it lives its pid, which is the group id, cannot
	// be reused: the group holds only its own descendants.
	if err := unix.PidfdSendSignal(fd, unix.SIGSTOP, nil, 0); err != nil {
		return 0, nil
	}
	if !id.Alive() {
		return 0, nil
	}
	killed := []int{id.PID}
	if rec.PGID == id.PID {
		if stats, err := scanStats(); err == nil {
			for _, st := range stats {
				if st.pgrp == rec.PGID && st.pid != id.PID && !st.exited() {
					killed = append(killed, st.pid)
				}
			}
		}
		_ = syscall.Kill(-rec.PGID, syscall.SIGKILL)
	}
	if err := unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
		return 0, fmt.Errorf("lifecycle: kill %d: %w", id.PID, err)
	}
	waitPidfd(fd, time.Second)
	for _, pid := range killed {
		detail := "worker of a dead run"
		if pid != id.PID {
			detail = "in the process group of a worker of a dead run"
		}
		emit(events, Event{Kind: KindOrphanReaped, Node: rec.Node, Run: rec.Run, Worker: rec.Worker, PID: pid, PGID: rec.PGID, Detail: detail})
	}
	return len(killed), nil
}
