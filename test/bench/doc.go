// Command bench is `make bench` (issue 6): it measures
// pyfleet on this machine, each figure beside its baseline, alternating the
// two (A B A B) and quoting medians, and writes docs/benchmarks.md.
//
//	PYFLEET_TEST_PYTHON=python/.venv/bin/python go run ./test/bench [flags]
//
// It builds poolnode, starts its own nodes (state dirs under a temporary
// directory, NATS on random ports), its own Python workers for the
// direct-gRPC ceilings, and the relay floor in front of the same workers
// (relay.go: this binary re-run with relayArg), and kills every process it
// started however it ends.
package main
