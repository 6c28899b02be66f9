package lifecycle

// ReaperStats counts the processes a Reaper's sweeps killed.
type ReaperStats struct {
	// AtStart: killed by the sweeps before Run, which is what dead runs
	// had left when the node started.
	AtStart int64
	// Periodic: killed by the sweeps of Run. Each one outlived its own
	// run's supervision (its worker's end, the guardian, containment)
	// for a sweep interval or more.
	Periodic int64
}

// Stats returns what the sweeps have killed so far. Reaps of adopted
// orphans (ReaperConfig.Spawner) are not sweeps and are not counted.
func (r *Reaper) Stats() ReaperStats {
	return ReaperStats{AtStart: r.atStart.Load(), Periodic: r.periodic.Load()}
}

// countKill is the sweeps' Events: it counts each kill, then passes the
// event on.
func (r *Reaper) countKill(ev Event) {
	if ev.Kind == KindOrphanReaped {
		if r.running.Load() {
			r.periodic.Add(1)
		} else {
			r.atStart.Add(1)
		}
	}
	if r.events != nil {
		r.events(ev)
	}
}
