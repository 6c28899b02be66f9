package metrics_test

import (
	"context"
	"fmt"
	"time"

	"github.com/pyfleet/pyfleet/lifecycle"
	"github.com/pyfleet/pyfleet/metrics"
)

// A node makes one Metrics, hands its Event method to the pool next to the
// event publisher, reports each answered call, and serves the registry.
func Example() {
	m := metrics.New("default", "node-1")
	m.SetFunctions([]string{"echo", "count"})
	m.SetPoolStats(func() (workers, busy, queued int) { return 2, 1, 0 })

	var events lifecycle.Events = m.Event // what pool.Config.Events takes (fanned out with bus)
	events(lifecycle.Event{Kind: lifecycle.KindSpawned})

	m.ObserveRequest("echo", 200, 300*time.Microsecond)
	m.ObserveRequest("nope", 404, 20*time.Microsecond)

	ln, err := metrics.Listen("127.0.0.1:0") // a bad --metrics address fails here, at start
	if err != nil {
		fmt.Println(err)
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Serve(ctx, ln, func() (bool, string) { return true, "" }) }()
	cancel() // the node stops
	fmt.Println("serve:", <-done)

	mfs, _ := m.Registry().Gather()
	for _, mf := range mfs {
		if mf.GetName() != "pyfleet_requests_total" {
			continue
		}
		for _, s := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range s.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			fmt.Printf("function=%s code=%s %g\n", labels["function"], labels["code"], s.GetCounter().GetValue())
		}
	}
	// Output:
	// serve: <nil>
	// function=count code=200 0
	// function=echo code=200 1
	// function=_unknown code=404 1
}
