// Package ui serves `submit ui`: one live page of the whole fleet (nodes,
// workers, functions, events, jobs) for an operator's browser, built only
// on what any NATS client sees. Nodes are polled on their status subject
// (docs/protocol.md, "Node status"), events followed live, jobs read from
// JetStream; the page gets the state over server-sent events, coalesced to
// at most four pushes a second so that a fleet of hundreds of workers does
// not flood it. The page and its script are embedded: no build step and no
// network beyond NATS and the browser's own connection.
//
// With Actions the page may requeue or discard a dead letter, cancel a
// job, recycle a worker or drain a node; each action is logged with the
// remote address that asked. Like the client package it must not import
// the server side (nats-server, bus, node, pool, lifecycle).
package ui
