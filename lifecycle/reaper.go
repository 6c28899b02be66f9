package lifecycle

import (
	"context"
	"errors"
	"fmt"
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
	// Interval between sweeps of the registry in Run; default 10 s.
	Interval time.Duration
	// AdoptInterval between reaps of adopted orphans in Run; default 1 s.
	AdoptInterval time.Duration
	Logger        *zap.Logger // default: no logging
}

// Reaper finds and kills what dead runs left behind, on this state dir.
type Reaper struct {
	cfg ReaperConfig
	log *zap.Logger
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
	}
	if cfg.AdoptInterval <= 0 {
		cfg.AdoptInterval = time.Second
	}
	log := cfg.Logger
	if log == nil {
		log = zap.NewNop()
	}
	return &Reaper{cfg: cfg, log: log.Named("reaper")}, nil
}

// Run sweeps every Interval (and reaps adopted orphans every AdoptInterval
// if a Spawner is configured) until ctx is done, then returns nil. Errors of
// single passes are logged, not returned: the next pass retries. Call Sweep
// once before Run, at node start, before any worker is spawned.
func (r *Reaper) Run(ctx context.Context) error {
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
			if _, err := r.cfg.Spawner.ReapAdopted(r.cfg.Events); err != nil && !errors.Is(err, ErrSpawnerClosed) {
				r.log.Warn("reap adopted orphans", zap.Error(err))
			}
		}
	}
}

// Sweep makes one pass over the state dir. For every run that is over (its
// node lock can be taken, or it left records but no lock file):
//
//   - each recorded worker whose identity (pid, start time, boot id) still
//     matches is killed with its process group;
//   - each process carrying the run's marker (EnvWorkerRun) is killed: this
//     finds what left the group (setsid, double fork);
//   - its records are deleted, and once a pass finds nothing left of it,
//     its lock file.
//
// Runs that are alive are left alone, except that records of their workers
// that are no longer running are deleted. Processes that carry the marker of
// a run this state dir has no trace of are never touched: they may belong to
// a node using another state dir. Every kill is reported as orphan_reaped.
func (r *Reaper) Sweep() error {
	recs, err := r.cfg.Registry.List()
	if err != nil {
		return err
	}
	runs := make(map[Marker][]Record)
	for _, rec := range recs {
		m := Marker{Node: rec.Node, Run: rec.Run}
		runs[m] = append(runs[m], rec)
	}
	locked, err := lockedRuns(r.cfg.StateDir)
	if err != nil {
		return err
	}
	for _, m := range locked {
		if _, ok := runs[m]; !ok {
			runs[m] = nil
		}
	}

	var errs []error
	for m, recs := range runs {
		if runStateOf(r.cfg.StateDir, m.Node, m.Run) == runAlive {
			for _, rec := range recs {
				// The node replaces or deletes these itself; deleteIf
				// never removes a record it updated meanwhile.
				if rec.PID != 0 && !rec.Identity().Alive() {
					errs = append(errs, r.cfg.Registry.deleteIf(rec))
				}
			}
			continue
		}
		errs = append(errs, r.sweepDeadRun(m, recs))
	}
	return errors.Join(errs...)
}

func (r *Reaper) sweepDeadRun(m Marker, recs []Record) error {
	events := r.cfg.Events
	if len(recs) > 0 && recs[0].Pool != "" && events != nil {
		pool := recs[0].Pool
		events = func(ev Event) {
			ev.Pool = pool
			r.cfg.Events(ev)
		}
	}
	found := 0
	var errs []error
	for _, rec := range recs {
		n, err := killRecorded(rec, events)
		found += n
		errs = append(errs, err)
	}
	run := m.RunValue()
	n, err := killMarked(func(k marks) bool { return k.run == run }, "carried the marker of dead run "+run, events)
	found += n
	errs = append(errs, err)
	if err := errors.Join(errs...); err != nil {
		return err // records and tombstone stay for the next pass
	}
	for _, rec := range recs {
		errs = append(errs, r.cfg.Registry.deleteIf(rec))
	}
	if found > 0 {
		r.log.Info("reaped a dead run", zap.String("node", m.Node), zap.String("run", m.Run), zap.Int("killed", found))
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
