package lifecycle

import (
	"errors"
	"fmt"
	"os/exec"
)

// Containment modes, strongest first. A mode keeps each worker's whole
// process tree where the node can find and kill it, however the tree
// scatters itself (setsid, a fresh environment, double forks).
const (
	// ModeCgroup puts each worker and all its descendants in a cgroup v2
	// of their own under the node's; ending a worker, the guardian's sweep
	// and a later node's sweep of a dead run use cgroup.kill. Where the
	// host also allows PID namespaces, each worker runs under ModePIDNS's
	// init inside its cgroup too, so that its tree dies within
	// milliseconds even when the node and its guardian die together.
	ModeCgroup = "cgroup"
	// ModePIDNS runs each worker under a tiny init that is PID 1 of a new
	// PID namespace; when that init dies the kernel kills everything in
	// the namespace.
	ModePIDNS = "pidns"
	// ModeGroup is process groups, parent-death signals, markers and the
	// guardian only: what every host allows.
	ModeGroup = "group"
	// ModeAuto picks the strongest mode the host offers.
	ModeAuto = "auto"
)

// ErrContainmentUnavailable is wrapped by the error of a containment mode
// the host does not offer; the text says why.
var ErrContainmentUnavailable = errors.New("containment unavailable")

// Containment is a way of keeping workers' trees. One value serves one run
// of a node: it knows where that run's containers live.
type Containment interface {
	// Mode is one of ModeCgroup, ModePIDNS, ModeGroup.
	Mode() string
	// Prepare is called by Start before the fork of the worker start m
	// (m.Worker set). It may change cmd (Path, Args, SysProcAttr, Env,
	// ExtraFiles) so that the child starts inside its container, and
	// returns the container, which Start owns from then on. It must not
	// fork.
	Prepare(cmd *exec.Cmd, m Marker) (Container, error)
}

// Container is one worker start's container, owned by its Process.
type Container interface {
	// Kill kills everything left in the container. Start calls it when the
	// worker's leader has exited, before the leader is reaped.
	Kill() error
	// Release frees what the container holds (a cgroup directory, an fd)
	// once everything in it is gone. Start calls it after the reap; it is
	// also called, without Kill, when the fork failed.
	Release() error
}

// ExitReporter is a Container that knows better than its leader's wait
// status how the command ended: in ModePIDNS the leader is the namespace's
// init, which cannot die of the signal that killed the command it ran.
// Start asks it, when it has one, for the exit status it reports.
type ExitReporter interface {
	Exit(leader ExitStatus) ExitStatus
}

// Limits are hard limits on one worker's whole tree; a zero field is no
// limit. Only a Containment that is also a Limiter can enforce them.
type Limits struct {
	Memory uint64 // bytes the tree may use (memory.max); the kernel's OOM killer ends the tree beyond
	Pids   int    // processes and threads the tree may hold at once (pids.max)
}

// IsZero reports whether l limits nothing.
func (l Limits) IsZero() bool { return l == Limits{} }

// Limiter is a Containment that can enforce Limits (ModeCgroup, where the
// host gives it the controllers). Start uses PrepareLimited instead of
// Prepare when StartOptions.Limits is set.
type Limiter interface {
	Containment
	// CheckLimits returns nil if every limit set in lim can be enforced,
	// else an error wrapping ErrContainmentUnavailable that names the
	// controller missing and why. A node calls it at start.
	CheckLimits(lim Limits) error
	// PrepareLimited is Prepare, with lim set on the container before the
	// fork.
	PrepareLimited(cmd *exec.Cmd, m Marker, lim Limits) (Container, error)
}

// Accounting is a Container that accounts for its whole tree itself (a
// cgroup with the memory controller). Process.Memory and ExitStatus.OOMKilled
// read it; a Container without it leaves memory to TreeRSS.
type Accounting interface {
	// Memory is the memory the tree uses now (memory.current); ok is
	// false when the container does not account for memory.
	Memory() (bytes uint64, ok bool)
	// OOMKills is how many of the tree's processes the kernel's OOM killer
	// has killed inside the container (memory.events oom_kill).
	OOMKills() int
}

// groupContainment is ModeGroup: Start's process groups, markers and
// parent-death signals are all there is, so it changes nothing.
type groupContainment struct{}

// GroupContainment returns ModeGroup's Containment.
func GroupContainment() Containment { return groupContainment{} }

func (groupContainment) Mode() string { return ModeGroup }

func (groupContainment) Prepare(*exec.Cmd, Marker) (Container, error) { return noContainer{}, nil }

type noContainer struct{}

func (noContainer) Kill() error    { return nil }
func (noContainer) Release() error { return nil }

// ValidMode reports whether mode names a containment mode (or ModeAuto).
func ValidMode(mode string) error {
	switch mode {
	case ModeAuto, ModeCgroup, ModePIDNS, ModeGroup:
		return nil
	}
	return fmt.Errorf("containment %q: want one of %s, %s, %s, %s", mode, ModeAuto, ModeCgroup, ModePIDNS, ModeGroup)
}

// NewContainment returns the Containment of mode for run m (m.Worker empty).
// ModeAuto takes the strongest mode the host offers; passedOver then says,
// one line a mode, why each stronger one was not taken. A mode asked for by
// name that the host does not offer is an error wrapping
// ErrContainmentUnavailable.
func NewContainment(mode string, m Marker) (c Containment, passedOver []string, err error) {
	if err := ValidMode(mode); err != nil {
		return nil, nil, err
	}
	makers := []struct {
		mode string
		make func(Marker) (Containment, error)
	}{
		{ModeCgroup, NewCgroupContainment},
		{ModePIDNS, NewPIDNSContainment},
		{ModeGroup, func(Marker) (Containment, error) { return GroupContainment(), nil }},
	}
	for _, mk := range makers {
		if mode != ModeAuto && mode != mk.mode {
			continue
		}
		c, err := mk.make(m)
		if err == nil {
			return c, passedOver, nil
		}
		if mode != ModeAuto {
			return nil, nil, err
		}
		passedOver = append(passedOver, mk.mode+": "+err.Error())
	}
	return nil, passedOver, fmt.Errorf("%w: no containment mode is available", ErrContainmentUnavailable)
}
