// Package lifecycle starts, supervises, stops and reaps the processes of a
// pyfleet node, and finds and kills the ones a dead node or worker left
// behind. It is the low layer: it knows nothing of pools, requests or NATS.
//
// It owns:
//
//   - spawning: a Spawner forks every child from one locked OS thread so
//     that Pdeathsig means "when the node dies"; Start puts each child in its
//     own process group and supervises it (Process: output lines, exit
//     status, Stop with a grace period); when a child exits, its group is
//     killed, and so is every process carrying its Marker;
//   - containment (Containment, NewContainment): a worker's whole tree
//     kept where the node can kill it, however it scatters itself; in
//     ModeCgroup a cgroup v2 per worker start under the run's (cgroup.go),
//     with optional hard Limits; in ModePIDNS (and in ModeCgroup where the
//     host allows) each worker runs under an init (package pidinit:
//     bin/pyfleet-init, or this binary re-executed with InitArg) that is
//     PID 1 of a PID namespace of its own, whose death ends the namespace;
//   - preloading (StartTemplate, Template.Fork, preload.go): a template
//     process that imported the app once forks each worker, which the node
//     then supervises as a Process like any other;
//   - identity: a process is named by pid, start time and boot id
//     (Identity), never by pid alone, because pids are reused; WorkerPID
//     finds the interpreter behind a worker's init;
//   - markers: environment variables (EnvWorkerRun, EnvWorkerID,
//     EnvWorkerSpawn) that follow a worker's descendants through setsid
//     and double forks (Marker, KillMarked, RunProcesses);
//   - node liveness: a run of a node holds a flock for its life
//     (AcquireNodeLock, NodeAlive), which the kernel drops when it dies;
//     its registry records name its node process too, so a run whose lock
//     file was removed under it still counts as alive, and its own Reaper
//     puts the file back (NodeLock.Ensure);
//   - the registry of worker processes per state dir (Registry), shared by
//     the nodes that use the dir; it and the lock files are 0600, and one
//     that another user owns or could write is refused (ErrNotPrivate);
//   - reaping: the orphans this process adopts as a child subreaper
//     (SetChildSubreaper, Spawner.ReapAdopted), and everything dead runs left
//     (Reaper);
//   - the guardian (StartGuardian): a process that outlives its node to kill
//     the run's cgroup, its workers' process groups and its marked
//     processes, and leaves a journal of its kills that the next node
//     publishes (PublishJournals);
//   - memory accounting of a process tree (TreeRSS, TreeRSSOf, or the
//     container's own: Process.Memory);
//   - the lifecycle event types (Event, Events, the Kind and Reason
//     constants) that other packages publish.
//
// The promise it serves (README.md, "How a worker is supervised"): no process a worker started
// survives the node, and nothing pyfleet did not start is ever killed. A
// process is killed only when its identity or its marker proves it ours, and
// every signal sent by number (a pid or a process group id) is sent only
// while that number provably still names a process of ours; the comment at
// each such call says why. Every kill of a process nobody supervises any more
// is reported as an orphan_reaped event.
//
// A node wires it in this order:
//
//	lock, _ := lifecycle.AcquireNodeLock(stateDir, node, run) // first: the run is alive from here on
//	contain, _, _ := lifecycle.NewContainment(lifecycle.ModeAuto, lifecycle.Marker{Node: node, Run: run})
//	reg, _ := lifecycle.OpenRegistry(filepath.Join(stateDir, "registry.db"))
//	_ = lifecycle.SetChildSubreaper()
//	spawner := lifecycle.NewSpawner()
//	reaper, _ := lifecycle.NewReaper(lifecycle.ReaperConfig{StateDir: stateDir, Registry: reg, Spawner: spawner, Lock: lock, Events: publish, Containment: contain})
//	_ = reaper.Sweep()    // before any worker starts: clears what dead runs left
//	_, _ = lifecycle.PublishJournals(stateDir, publish) // the kills of dead runs' guardians
//	go reaper.Run(ctx)    // owned and waited for by the node
//	guardian, _ := lifecycle.StartGuardian(lifecycle.Marker{Node: node, Run: run}, stateDir, contain)
//
// and for each worker: Registry.Put (StateStarting, no pid), Start (or,
// with a template, Template.Fork) with StartOptions.Marker, Contain,
// Guardian (and Limits), Registry.Put again with Record.SetProcess; on
// exit, Process.Stop, then Registry.Delete. On the way out: stop every
// worker, KillMarked(Marker{Node: node, Run: run}), Guardian.Stop (which
// removes the run's cgroup), stop the reaper, Spawner.Close, the
// containment's Close if it has one, NodeLock.Release last.
package lifecycle
