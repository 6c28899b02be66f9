// Command submit is the client side of pyfleet: it calls functions
// (call), submits and awaits JetStream jobs (job), reads and cancels them
// (status, cancel), manages recurring jobs (schedules), follows lifecycle
// events (watch), lists live nodes and a pool's functions (nodes, fns),
// reloads the app on nodes (reload), serves a live web view of the fleet
// (ui) and load-tests a pool (bench), talking to NATS only.
//
// It owns nothing on the node side and no protocol code: every exchange
// with the fleet goes through package client (the Go client of
// docs/protocol.md), and package ui for the web view, and what is left
// here is the command line: flags and their checks, reading the argument,
// printing answers, nodes and events, exit statuses, and the bench loop.
// It imports neither bus nor nats-server, so the binary stays a small
// NATS client.
//
// Exit status: 0 success, 1 the function failed (its error on stderr as
// "code type: message"), 2 usage, 3 no node answered, the deadline passed or
// NATS could not be reached, 130 interrupted while waiting for an answer.
package main
