// Package test holds pyfleet's end-to-end tests: the built binaries
// (bin/poolnode, bin/submit) against real NATS servers (embedded on random
// ports, or nats-server processes for clusters and old servers), real
// Python workers from python/.venv (PYFLEET_TEST_PYTHON) and real signals.
// The harness (harness_test.go) starts each node with a marker of its own
// and fails the test if any process carrying it outlives the test.
//
// It has no code outside its tests.
package test
