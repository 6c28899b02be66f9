package bus_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"go.uber.org/zap"

	"github.com/pyfleet/pyfleet/bus"
	"github.com/pyfleet/pyfleet/call"
)

// echoHandler answers echo with its payload and keeps nothing, so that a
// benchmark's allocations are the bus's, not a handler's record.
type echoHandler struct{}

func (echoHandler) Functions() []call.Function { return []call.Function{{Name: "echo"}} }

func (echoHandler) Call(_ context.Context, req *call.Request, _ call.Emit) (call.Result, error) {
	return call.Result{Worker: "w1", Data: req.Payload}, nil
}

// benchBody is the 100-byte JSON body of make bench's echo (test/bench).
var benchBody = []byte(`{"message":"` + strings.Repeat("x", 100-len(`{"message":"","n":1}`)) + `","n":1}`)

// serveEcho sets up what a node with an embedded server has: the service on
// an in-process connection (node/start.go), or over TCP if tcp, and a caller
// over TCP.
func serveEcho(b *testing.B, tcp bool) *nats.Conn {
	// Quiet: zaptest's logger prints a benchmark's log with its result.
	srv, err := bus.StartEmbedded(bus.EmbeddedConfig{Listen: "127.0.0.1:0", StoreDir: b.TempDir()}, zap.NewNop())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	})
	cc := bus.ConnConfig{InProcess: srv, Name: "node"}
	if tcp {
		cc = bus.ConnConfig{URLs: srv.ClientURL(), Name: "node"}
	}
	nc, err := bus.Connect(cc, nil)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(nc.Close)
	s, err := bus.Serve(nc, bus.ServiceConfig{Pool: "p", Node: "n1"}, echoHandler{}, zap.NewNop())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = s.Stop(ctx)
	})
	client, err := bus.Connect(bus.ConnConfig{URLs: srv.ClientURL(), Name: "caller"}, nil)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(client.Close)
	return client
}

// BenchmarkServiceRequest is one request at a time through the service, the
// caller's allocations included (they are the same before and after a
// change to the bus).
func BenchmarkServiceRequest(b *testing.B) {
	client := serveEcho(b, false)
	b.ReportAllocs()
	for b.Loop() {
		m, err := client.Request("pyfleet.req.p.echo", benchBody, 5*time.Second)
		if err != nil {
			b.Fatal(err)
		}
		if m.Header.Get("Pyfleet-Status") != "ok" {
			b.Fatalf("reply %v %s", m.Header, m.Data)
		}
	}
}

// BenchmarkServiceRequestParallel keeps 16 requests in flight (on 2
// cores), as make bench's rr16 does; the node's own connection in process
// (what poolnode does with its embedded server) or over loopback TCP.
func BenchmarkServiceRequestParallel(b *testing.B) {
	for _, conn := range []string{"inprocess", "tcp"} {
		b.Run(conn, func(b *testing.B) {
			client := serveEcho(b, conn == "tcp")
			b.ReportAllocs()
			b.ResetTimer()
			b.SetParallelism(8)
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					m, err := client.Request("pyfleet.req.p.echo", benchBody, 5*time.Second)
					if err != nil {
						b.Error(err)
						return
					}
					if m.Header.Get("Pyfleet-Status") != "ok" {
						b.Errorf("reply %v %s", m.Header, m.Data)
						return
					}
				}
			})
		})
	}
}
