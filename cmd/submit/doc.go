// Command submit is the client side of pyfleet: it calls functions, submits
// and awaits JetStream jobs, follows lifecycle events, lists live nodes and
// load-tests a pool, talking to NATS only.
//
// It owns nothing on the node side. What it relies on is the wire contract
// of docs/protocol.md, through package protocol: the request, job, result
// and event subjects under the prefix, the Pyfleet-* and
// Nats-Service-Error* headers, the chunk/end/heartbeat stream framing, the
// error body, and the micro service named "pyfleet" whose STATS carry the
// node's metadata and load figures. It imports neither bus nor nats-server,
// so the binary stays a small NATS client.
//
// Exit status: 0 success, 1 the function failed (its error on stderr as
// "code type: message"), 2 usage, 3 no node answered, the deadline passed or
// NATS could not be reached, 130 interrupted while waiting for an answer.
package main
