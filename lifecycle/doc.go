// Package lifecycle starts, supervises, stops and reaps the processes of a
// pyfleet node, and finds and kills the ones a dead node or worker left
// behind. It is the low layer: it knows nothing of pools, requests or NATS.
//
// It owns:
//
//   - spawning: a Spawner forks every child from one locked OS thread so
//     that Pdeathsig means "when the node dies"; Start puts each child in its
//     own process group and supervises it (Process: output lines, exit
//     status, Stop with a grace period);
//   - identity: a process is named by pid, start time and boot id
//     (Identity), never by pid alone, because pids are reused;
//   - memory accounting of a process tree (TreeRSS);
//   - the lifecycle event types (Event, Events, the Kind and Reason
//     constants) that other packages publish.
//
// The promise it serves (SPEC section 6): no process a worker started
// survives the node, and nothing pyfleet did not start is ever killed. Every
// signal this package sends by number (a pid or a process group id) is sent
// only while that number provably still names a process of ours; the comment
// at each such call says why.
package lifecycle
