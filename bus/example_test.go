package bus_test

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/bus"
	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/protocol"
)

// upper is a one-function call.Handler.
type upper struct{}

func (upper) Functions() []call.Function { return []call.Function{{Name: "shout", Raw: true}} }

func (upper) Call(_ context.Context, req *call.Request, _ call.Emit) (call.Result, error) {
	out := make([]byte, len(req.Payload))
	for i, c := range req.Payload {
		if 'a' <= c && c <= 'z' {
			c -= 'a' - 'A'
		}
		out[i] = c
	}
	return call.Result{Worker: "w0", Data: out}, nil
}

// A node's wiring in miniature: an embedded server, an in-process
// connection, the service, a caller, and the shutdown in reverse order.
func Example() {
	dir, _ := os.MkdirTemp("", "pyfleet-example")
	defer os.RemoveAll(dir)
	srv, err := bus.StartEmbedded(bus.EmbeddedConfig{Listen: "127.0.0.1:0", StoreDir: dir}, nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer srv.WaitForShutdown()
	defer srv.Shutdown()

	nc, err := bus.Connect(bus.ConnConfig{InProcess: srv, Name: "pyfleet default/n1"}, nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer nc.Close()
	svc, err := bus.Serve(nc, bus.ServiceConfig{Pool: "default", Node: "n1"}, upper{}, nil)
	if err != nil {
		fmt.Println(err)
		return
	}

	caller, _ := nats.Connect(srv.ClientURL())
	defer caller.Close()
	for _, fn := range []string{"shout", "whisper"} {
		reply, _ := caller.Request("pyfleet.req.default."+fn, []byte("hello"), time.Second)
		if e := protocol.ReplyError(reply.Header, reply.Data); e != nil {
			fmt.Println(e.Code, e.Type)
			continue
		}
		fmt.Println(string(reply.Data), "from", reply.Header.Get(protocol.HeaderNode))
	}

	svc.Drain()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = svc.Stop(ctx)
	// Output:
	// HELLO from n1
	// 404 NotFound
}
