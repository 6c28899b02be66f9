// Command examples runs the examples in examples/ (make examples): for
// each, a poolnode with an embedded NATS server on a random port serving
// the example's app.py, then its client.py against it, then a stop of the
// node; it prints one line per example with the figure the client printed
// and the number of the node's processes still alive after the stop,
// which must be 0. TestExamples runs the same with fewer workers.
//
//	PYFLEET_TEST_PYTHON=python/.venv/bin/python go run ./test/examples [flags]
package main
