package lifecycle

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// SetChildSubreaper makes this process the child subreaper of its
// descendants (PR_SET_CHILD_SUBREAPER): a process whose parent dies is
// re-parented to the nearest living subreaper instead of to init, so the
// node keeps finding what its workers started, and must reap it
// (Spawner.ReapAdopted). It applies to the whole process and cannot be undone
// by its descendants.
func SetChildSubreaper() error {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("lifecycle: set child subreaper: %w", err)
	}
	return nil
}

// ReapAdopted kills and reaps the children this process adopted as a
// subreaper: processes whose parent, a worker or one of its descendants, died.
// Such a process is ours (it descends from a process we started) but nobody
// supervises it any more. It is left alone while it carries the marks of a
// worker start that is still running (that worker's Stop takes it along);
// otherwise it is killed, reported as orphan_reaped, and reaped. It returns
// how many processes it reaped.
//
// It never calls wait4(-1), which would steal the exit status of children
// that os/exec waits for; it waits for each adopted pid by number. It tells
// adopted children from the ones os/exec started by two facts: every child
// this Spawner starts is registered before the next fork (and the
// classification runs on the forking thread, between forks), and a child
// started with os/exec elsewhere stays in this process's group unless it asks
// for another. So: run one Spawner per process, and start any other child in
// this process's own group.
func (s *Spawner) ReapAdopted(events Events) (int, error) {
	var (
		adopted []procStat
		live    map[marks]bool
		scanErr error
	)
	err := s.do(func() {
		var stats []procStat
		if stats, scanErr = scanStats(); scanErr != nil {
			return
		}
		self, group := os.Getpid(), syscall.Getpgrp()
		s.mu.Lock()
		defer s.mu.Unlock()
		live = make(map[marks]bool, len(s.children))
		for _, k := range s.children {
			live[k] = true
		}
		for _, st := range stats {
			if _, ours := s.children[st.pid]; !ours && st.ppid == self && st.pgrp != group {
				adopted = append(adopted, st)
			}
		}
	})
	if err = errors.Join(err, scanErr); err != nil {
		return 0, err
	}

	reaped := 0
	var errs []error
	for _, st := range adopted {
		if !st.exited() {
			k, err := readMarks(st.pid)
			if err == nil && k != (marks{}) && live[k] {
				continue
			}
			killed, err := killIf(st.pid, func(pid int) bool {
				now, err := readStat(pid)
				return err == nil && now.ppid == st.ppid && now.startTime == st.startTime
			})
			if err != nil {
				errs = append(errs, err)
				continue
			}
			if killed {
				m := k.marker()
				emit(events, Event{Kind: KindOrphanReaped, Node: m.Node, Run: m.Run, Worker: m.Worker, PID: st.pid, PGID: st.pgrp,
					Detail: "re-parented to the node after its parent exited"})
			}
		}
		// By pid, and only if it has exited (killIf waited for that):
		// this pid is our child and not one os/exec waits for, so nobody
		// else reaps it and its number cannot have been reused.
		var ws unix.WaitStatus
		if pid, err := unix.Wait4(st.pid, &ws, unix.WNOHANG, nil); err == nil && pid == st.pid {
			reaped++
		}
	}
	return reaped, errors.Join(errs...)
}
