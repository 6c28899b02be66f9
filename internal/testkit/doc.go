// Package testkit owns the helpers shared by the tests of several packages
// (a _test.go file cannot be imported from another package): a throwaway
// local user, a throwaway PKI, and the check that a TLS-only NATS server
// turns a plain client away. Only tests import it.
package testkit
