// Package protocol is pyfleet's wire contract as Go names: the subjects
// under a prefix, the header names and values, the error body and the dead
// letter body, the micro service's name and metadata keys, the rule for
// subject tokens, and how a client reads a reply. docs/protocol.md describes
// the same contract for clients in any language.
//
// Both sides use it: bus (the node's NATS side) builds what it sends with
// these names, and cmd/submit and the tests read replies with them. It
// imports nats.go for nats.Header and call for the error codes and types
// (call.Code*, call.Type*), never nats-server, so a client that imports it
// stays small. It owns no goroutines and no state.
package protocol
