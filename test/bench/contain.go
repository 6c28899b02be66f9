package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
)

// containModes are the --containment modes, strongest first (issue 10).
var containModes = []string{"cgroup", "pidns", "group"}

// cleanChildTag starts the argv[0] of the clean-environment children that
// test/bench/benchapp.py starts when BENCH_CLEAN_CHILD names one.
const cleanChildTag = "pyfleet-bench-sleep-"

// ckey names a result of containedLife: kind, h.big and the mode.
func (h *harness) ckey(kind, mode string) string { return fmt.Sprintf("%s%d/%s", kind, h.big, mode) }

// spawnKey and spawnCPUKey name the results of spawnCost.
func spawnKey(mode string) string    { return "spawn1/" + mode }
func spawnCPUKey(mode string) string { return "spawncpu1/" + mode }

// event is the part of a lifecycle event (docs/protocol.md, "Events") the
// harness reads.
type event struct {
	Kind   string `json:"kind"`
	Worker string `json:"worker"`
	Reason string `json:"reason"`
	Detail string `json:"detail"`
	PID    int    `json:"pid"`
}

// watchEvents subscribes to the lifecycle events of node name.
func watchEvents(nc *nats.Conn, name string) (<-chan event, func(), error) {
	msgs := make(chan *nats.Msg, 4096)
	sub, err := nc.ChanSubscribe("pyfleet.evt.default."+name+".>", msgs)
	if err != nil {
		return nil, nil, err
	}
	if err := nc.Flush(); err != nil {
		_ = sub.Unsubscribe()
		return nil, nil, err
	}
	out := make(chan event, 4096)
	quit, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		for {
			var m *nats.Msg
			select {
			case m = <-msgs:
			case <-quit:
				return
			}
			var e event
			if json.Unmarshal(m.Data, &e) != nil {
				continue
			}
			select {
			case out <- e:
			case <-quit:
				return
			}
		}
	}()
	// msgs is never closed: the client may still hold a message for it
	// as Unsubscribe returns.
	return out, func() {
		_ = sub.Unsubscribe()
		close(quit)
		<-done
	}, nil
}

// serviceMode asks the micro services on nc for node name's containment
// metadata: the mode it runs in. A node adds its service once its workers
// are ready, so a node that has not yet is asked again.
func serviceMode(nc *nats.Conn, name string) (string, error) {
	inbox := nats.NewInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		return "", err
	}
	defer sub.Unsubscribe()
	for end := time.Now().Add(30 * time.Second); time.Now().Before(end); {
		if err := nc.PublishRequest("$SRV.INFO.pyfleet", inbox, nil); err != nil {
			return "", err
		}
		for again := time.Now().Add(200 * time.Millisecond); ; {
			m, err := sub.NextMsg(time.Until(again))
			if err != nil {
				break
			}
			var info struct {
				Metadata map[string]string `json:"metadata"`
			}
			if json.Unmarshal(m.Data, &info) == nil && info.Metadata["node"] == name {
				return info.Metadata["containment"], nil
			}
		}
	}
	return "", fmt.Errorf("node %s did not answer $SRV.INFO within 30 s", name)
}

// containment is figures 7 and 8 (issue 10), per containment mode the
// machine offers: a worker's spawn to ready, alone, and with h.big workers
// (each with a clean-environment child of its own) the time until all are
// ready and the time from the node's SIGKILL until the last process of the
// run is gone.
func (h *harness) containment(ctx context.Context) error {
	url, nc, stop, err := h.harnessNATS("nats-contain")
	if err != nil {
		return err
	}
	defer stop()
	modes, err := h.spawnCost(ctx, nc, url)
	if err != nil {
		return err
	}
	for r := range h.rounds {
		for i := range modes {
			// Each mode in turn, starting one further each round.
			if err := h.containedLife(ctx, nc, url, modes[(i+r)%len(modes)], r); err != nil {
				return err
			}
		}
	}
	return nil
}

// spawnNode is a node with one worker that is replaced after every call.
type spawnNode struct {
	mode   string
	n      *node
	events <-chan event
	stop   func()
}

// spawnCost is figure 8: one worker's spawn to ready, alone on the node and
// so, on a quiet machine, alone on the CPUs. One node per mode, each with one
// worker and --max-requests 1; a call makes the node start a replacement,
// timed from the call's answer to its ready event; the modes take turns.
// It returns the modes the machine offers.
func (h *harness) spawnCost(ctx context.Context, nc *nats.Conn, url string) ([]string, error) {
	var nodes []*spawnNode
	defer func() {
		for _, s := range nodes {
			s.n.close()
			s.stop()
		}
	}()
	for _, mode := range containModes {
		s, err := h.startSpawnNode(ctx, nc, url, mode)
		if err != nil {
			return nil, err
		}
		if s != nil {
			nodes = append(nodes, s)
		}
	}
	if len(nodes) == 0 || nodes[len(nodes)-1].mode != "group" {
		return nil, errors.New("containment: group mode, which every host offers, did not start")
	}
	rounds := 10 * h.rounds
	for r := -1; r < rounds; r++ { // round -1: a warm-up
		for i := range nodes {
			s := nodes[(i+r+1)%len(nodes)]
			d, cpu, err := h.respawn(ctx, nc, s)
			if err != nil {
				return nil, err
			}
			if r >= 0 {
				h.res.addValue(spawnKey(s.mode), d.Seconds())
				h.res.addValue(spawnCPUKey(s.mode), cpu.Seconds())
			}
		}
	}
	var modes []string
	for _, s := range nodes {
		modes = append(modes, s.mode)
		h.logf("spawn to ready, one worker alone, --containment %s: median %.1f ms, CPU %.1f ms, of %d", s.mode,
			median(h.res.vals[spawnKey(s.mode)])*1000, median(h.res.vals[spawnCPUKey(s.mode)])*1000, rounds)
	}
	return modes, nil
}

// startSpawnNode starts spawnCost's node of mode, or returns nil if the
// machine does not offer the mode (the node exits 2 saying why).
func (h *harness) startSpawnNode(ctx context.Context, nc *nats.Conn, url, mode string) (*spawnNode, error) {
	short := "spawn-" + mode
	events, stop, err := watchEvents(nc, h.id+"-"+short)
	if err != nil {
		return nil, err
	}
	n, err := h.startNode(ctx, short, nodeOpts{workers: 1, concurrency: 1, natsURL: url, containment: mode, maxRequests: 1})
	if err != nil {
		stop()
		return nil, err
	}
	s := &spawnNode{mode: mode, n: n, events: events, stop: stop}
	err = waitReady(ctx, n, events, 1, time.Minute)
	if err != nil && n.p.exited() && n.p.cmd.ProcessState.ExitCode() == 2 && mode != "group" {
		h.res.notOffered = append(h.res.notOffered, fmt.Sprintf("`%s`: %s", mode, lastLine(n.p.tail())))
		h.logf("containment %s: not offered by this machine: %s", mode, lastLine(n.p.tail()))
		stop()
		return nil, nil
	}
	if err == nil {
		err = checkMode(nc, n, mode)
	}
	if err != nil {
		n.close()
		stop()
		return nil, err
	}
	return s, nil
}

func checkMode(nc *nats.Conn, n *node, want string) error {
	got, err := serviceMode(nc, n.name)
	if err != nil {
		return err
	}
	if got != want {
		return fmt.Errorf("node %s asked for --containment %s runs in %q", n.name, want, got)
	}
	return nil
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// waitReady waits for want ready events of n.
func waitReady(ctx context.Context, n *node, events <-chan event, want int, within time.Duration) error {
	timeout := time.After(within)
	for got := 0; got < want; {
		select {
		case e := <-events:
			switch e.Kind {
			case "ready":
				got++
			case "spawn_failed", "crash_loop":
				return fmt.Errorf("node %s: %s: %s", n.name, e.Kind, e.Detail)
			}
		case <-n.p.done:
			return fmt.Errorf("node %s exited before its workers were ready:\n%s", n.name, n.p.tail())
		case <-timeout:
			return fmt.Errorf("node %s: only %d of %d workers ready in %s", n.name, got, want, within)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// respawn makes one call to s's node, which then replaces its worker, and
// returns the time from the call's answer to the new worker's ready event,
// and the CPU the start took: the node's from the call to the ready event,
// and the new worker's whole tree's (its init's too). It returns once the
// old worker is gone too, so that the next start has the machine to itself.
func (h *harness) respawn(ctx context.Context, nc *nats.Conn, s *spawnNode) (time.Duration, time.Duration, error) {
	subject := "pyfleet.node." + s.n.name + ".default.echo"
	cpu0 := schedCPU(s.n.p.pid())
	for end := time.Now().Add(30 * time.Second); ; {
		// The node's own subject may not be served yet right after start.
		m, err := nc.Request(subject, payload, 10*time.Second)
		if errors.Is(err, nats.ErrNoResponders) && time.Now().Before(end) {
			time.Sleep(20 * time.Millisecond)
			continue
		}
		if err != nil {
			return 0, 0, fmt.Errorf("%s: %w", subject, err)
		}
		if code := m.Header.Get(micro.ErrorCodeHeader); code != "" {
			return 0, 0, fmt.Errorf("%s: error %s: %s", subject, code, m.Data)
		}
		break
	}
	t0 := time.Now()
	var took, cpu time.Duration
	timeout := time.After(time.Minute)
	for ready, gone := false, false; !ready || !gone; {
		select {
		case e := <-s.events:
			switch {
			case e.Kind == "ready" && !ready:
				ready, took = true, time.Since(t0)
				cpu = schedCPU(s.n.p.pid()) - cpu0
				for _, p := range tree(e.PID) {
					cpu += schedCPU(p.pid)
				}
			case e.Kind == "terminated" && e.Reason == "recycle":
				gone = true
			case e.Kind == "crashed" || e.Kind == "spawn_failed" || e.Kind == "crash_loop":
				return 0, 0, fmt.Errorf("node %s: %s: %s", s.n.name, e.Kind, e.Detail)
			}
		case <-s.n.p.done:
			return 0, 0, fmt.Errorf("node %s exited:\n%s", s.n.name, s.n.p.tail())
		case <-timeout:
			return 0, 0, fmt.Errorf("node %s: no replacement ready and old worker gone within a minute", s.n.name)
		case <-ctx.Done():
			return 0, 0, ctx.Err()
		}
	}
	return took, cpu, nil
}

// containedLife is figure 7 for one mode: a node with h.big workers, each of
// which starts a clean-environment child of its own in a new session (what
// only kernel containment reaches once the node is dead), is timed to ready,
// then SIGKILLed and timed until the last process of the run is gone. In
// group mode those children survive (its known limit, README "How a worker
// is supervised"): they are counted, not waited for, and killed here.
func (h *harness) containedLife(ctx context.Context, nc *nats.Conn, url, mode string, round int) error {
	short := fmt.Sprintf("contain-%s-%d", mode, round)
	name := h.id + "-" + short
	tag := cleanChildTag + name
	// Whatever an error leaves of this run: its clean children stay behind
	// even a clean stop of a group-mode node.
	defer func() { killProcs(taggedProcs(tag), 10*time.Second) }()
	events, stop, err := watchEvents(nc, name)
	if err != nil {
		return err
	}
	defer stop()
	start := time.Now()
	n, err := h.startNode(ctx, short, nodeOpts{workers: h.big, concurrency: 1, natsURL: url, containment: mode,
		env: []string{"BENCH_CLEAN_CHILD=" + tag}})
	if err != nil {
		return err
	}
	defer n.close()
	if err := waitReady(ctx, n, events, h.big, 4*time.Minute); err != nil {
		return err
	}
	took := time.Since(start)
	run := tree(n.p.pid())
	var cpu time.Duration
	for _, p := range run {
		cpu += schedCPU(p.pid)
	}
	if err := checkMode(nc, n, mode); err != nil {
		return err
	}
	children := taggedProcs(tag)
	if len(children) != h.big {
		return fmt.Errorf("%s: %d clean-environment children for %d workers", name, len(children), h.big)
	}
	h.res.addValue(h.ckey("ready", mode), took.Seconds())
	h.res.addValue(h.ckey("startcpu", mode), cpu.Seconds()/float64(h.big))
	h.logf("contain %s round %d: %d workers ready in %.2f s, CPU %.1f ms a worker (node, workers, inits, children)",
		mode, round+1, h.big, took.Seconds(), cpu.Seconds()*1000/float64(h.big))
	return h.killRun(n, mode, round, run, children)
}

// killRun SIGKILLs n and times until every process of its run is gone: the
// node's tree as it was (guardian, inits, workers, their children), every
// process carrying its marker, and the workers' clean-environment children,
// by pid and start time. In group mode those children are not waited for.
func (h *harness) killRun(n *node, mode string, round int, run, children []procInfo) error {
	all := slices.Clone(run)
	for _, pid := range markedPIDs(n.name + "/") {
		if p, ok := readProcInfo(pid); ok {
			all = append(all, p)
		}
	}
	all = append(all, children...)
	slices.SortFunc(all, func(a, b procInfo) int { return a.pid - b.pid })
	all = slices.CompactFunc(all, func(a, b procInfo) bool { return a.pid == b.pid })
	spare := func(p procInfo) bool {
		return mode == "group" && slices.ContainsFunc(children, func(c procInfo) bool { return c.pid == p.pid })
	}
	pending := slices.DeleteFunc(slices.Clone(all), spare)
	t0 := time.Now()
	_ = syscall.Kill(n.p.pid(), syscall.SIGKILL)
	for {
		pending = slices.DeleteFunc(pending, func(p procInfo) bool { return !p.alive() })
		if len(pending) == 0 && n.p.exited() {
			break
		}
		if time.Since(t0) > 30*time.Second {
			return fmt.Errorf("%d processes of the killed node %s (--containment %s) alive after 30 s: %v", len(pending), n.name, mode, pending)
		}
		time.Sleep(2 * time.Millisecond)
	}
	gone := time.Since(t0)
	h.res.addValue(h.ckey("procs", mode), float64(len(all)))
	h.res.addValue(h.ckey("kill", mode), gone.Seconds())
	var survivors []procInfo
	if mode == "group" {
		for _, c := range children {
			if c.alive() {
				survivors = append(survivors, c)
			}
		}
		h.res.addValue(h.ckey("survivors", mode), float64(len(survivors)))
	}
	but := ""
	if mode == "group" {
		but = fmt.Sprintf(" but %d clean-environment children, which the bench now kills", len(survivors))
	}
	h.logf("contain %s round %d: %d processes; all gone %.0f ms after SIGKILL%s", mode, round+1, len(all), gone.Seconds()*1000, but)
	if left := killProcs(survivors, 10*time.Second); len(left) > 0 {
		return fmt.Errorf("clean-environment children of %s still alive after SIGKILL: %v", n.name, left)
	}
	return checkCgroupsGone(n.name)
}

// checkCgroupsGone fails if the run's cgroups outlive its processes (the
// guardian removes them before it exits, lifecycle/guardian.go), after
// removing them.
func checkCgroupsGone(name string) error {
	var left []string
	for end := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if left = runCgroups(name + "."); len(left) == 0 {
			return nil
		}
		if time.Now().After(end) {
			break
		}
	}
	return errors.Join(fmt.Errorf("cgroups of the killed node %s left behind: %v", name, left), removeCgroups(left))
}
