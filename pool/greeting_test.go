package pool

import (
	"context"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"

	workerpb "github.com/pyfleet/pyfleet/proto/workerpb"
)

// greeter is a Worker server whose Batches stream opens with first (nil:
// with nothing, until the node gives up). A real worker always opens with an
// empty batch (python/pyfleet/stream.py), so only a fake reaches the other
// cases.
type greeter struct {
	workerpb.UnimplementedWorkerServer
	first *workerpb.ResultBatch
}

func (g greeter) Batches(stream workerpb.Worker_BatchesServer) error {
	if g.first != nil {
		if err := stream.Send(g.first); err != nil {
			return err
		}
	}
	<-stream.Context().Done()
	return nil
}

// The node calls a worker ready only once its stream's first message, an
// empty batch, has come; a worker that sends nothing or something else
// first fails its start, and nothing of the dial stays open.
func TestDialAwaitsTheStreamsEmptyFirstMessage(t *testing.T) {
	cases := []struct {
		name    string
		first   *workerpb.ResultBatch
		wantErr string
	}{
		{"greets", &workerpb.ResultBatch{}, ""},
		{"silent", nil, "no first message: context deadline exceeded"},
		{"results first", &workerpb.ResultBatch{Results: []*workerpb.Result{{Id: 1}}}, "first message has 1 results, want none"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "w.sock")
			lis, err := net.Listen("unix", sock)
			if err != nil {
				t.Fatal(err)
			}
			srv := grpc.NewServer()
			workerpb.RegisterWorkerServer(srv, greeter{first: c.first})
			served := make(chan struct{})
			go func() {
				defer close(served)
				_ = srv.Serve(lis)
			}()
			defer func() {
				srv.Stop()
				<-served
			}()

			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			w := &worker{name: "w1"}
			err = w.dial(ctx, sock, "secret")
			if c.wantErr == "" {
				if err != nil {
					t.Fatalf("dial: %v", err)
				}
				w.conn.Close()
				return
			}
			if err == nil || !strings.Contains(err.Error(), c.wantErr) || !strings.Contains(err.Error(), "worker w1") {
				t.Fatalf("dial: %v, want an error naming worker w1 and %q", err, c.wantErr)
			}
			if w.conn != nil || w.stream != nil {
				t.Fatal("a failed dial kept its connection or stream")
			}
		})
	}
}
