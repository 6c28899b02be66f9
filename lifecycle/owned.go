package lifecycle

import (
	"fmt"
	"os"
)

// RunProcesses counts the live processes of run (its Node and Run; Worker
// is ignored), by the worker start that owns each (the Marker.Worker the
// start was given), from one pass over /proc. A process belongs to a start
// when it carries that start's marks; a process that carries no marks at
// all (a subprocess started with a fresh environment) belongs to the start
// of the marked leader of its process group, else to the first marked
// process above it by parent links. A process with the marks of another
// run is never counted, nor is anything below it.
//
// Zombies are left out, and so is an unmarked process that left both its
// worker's group and its parent (a daemon started with a fresh environment
// whose parent exited): nothing on the host ties it to the run any more.
// The key "" counts processes that carry the run's marker without naming a
// worker.
func RunProcesses(run Marker) (map[string]int, error) {
	if run.Node == "" || run.Run == "" {
		return nil, fmt.Errorf("%w: marker %+v names no run", ErrInvalidName, run)
	}
	pids, err := listPids()
	if err != nil {
		return nil, err
	}
	want, self := run.RunValue(), os.Getpid()
	type proc struct {
		st     procStat
		owner  string
		status ownership
	}
	procs := make(map[int]*proc, len(pids))
	leaders := map[int]string{} // process group → start, for groups led by a process of the run
	for _, pid := range pids {
		if pid == self {
			continue
		}
		st, err := readStat(pid)
		if err != nil || st.exited() {
			continue
		}
		p := &proc{st: st}
		// A process whose environ cannot be read (it exited meanwhile,
		// or belongs to another user) counts as unmarked.
		k, _ := readMarks(pid)
		switch {
		case k.run == want:
			p.status = owned
			if m := k.marker(); m.Node == run.Node && m.Run == run.Run {
				p.owner = m.Worker
			}
			if st.pgrp == pid {
				leaders[pid] = p.owner
			}
		case k != (marks{}):
			p.status = foreign
		}
		procs[pid] = p
	}

	// ownerOf settles an unmarked process by its group, else by its
	// parent, walking up until a settled process; everything on the way
	// gets the same answer, so each process is visited about once.
	ownerOf := func(p *proc) (string, bool) {
		var chain []*proc
		for p != nil && p.status == unsettled {
			if owner, ok := leaders[p.st.pgrp]; ok {
				p.status, p.owner = owned, owner
				break
			}
			p.status = visiting // a cycle (pids reused during the scan) ends here
			chain = append(chain, p)
			p = procs[p.st.ppid]
		}
		status, owner := foreign, ""
		if p != nil && p.status == owned {
			status, owner = owned, p.owner
		}
		for _, c := range chain {
			c.status, c.owner = status, owner
		}
		return owner, status == owned
	}
	counts := map[string]int{}
	for _, p := range procs {
		if owner, ok := ownerOf(p); ok {
			counts[owner]++
		}
	}
	return counts, nil
}

// ownership is how far RunProcesses has placed a process.
type ownership int8

const (
	unsettled ownership = iota
	visiting
	owned   // a process of the run
	foreign // not the run's: another run's marks, or nothing of the run above it
)
