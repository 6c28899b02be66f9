package bus_test

import (
	"context"
	"errors"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/protocol"
)

// ctxHandler has a function that reports progress and one that runs until
// its context ends, and says why it ended.
type ctxHandler struct {
	ended chan error // the cause of each "wait" call's end
}

func (*ctxHandler) Functions() []call.Function {
	return []call.Function{{Name: "progress"}, {Name: "wait"}}
}

func (h *ctxHandler) Call(ctx context.Context, req *call.Request, _ call.Emit) (call.Result, error) {
	switch req.Function {
	case "progress":
		for i := range 3 {
			if req.Progress != nil {
				req.Progress([]byte(strconv.Itoa(i)))
			}
		}
		return call.Result{Worker: "w1", Data: []byte(`"done"`)}, nil
	default:
		<-ctx.Done()
		h.ended <- context.Cause(ctx)
		return call.Result{}, ctx.Err()
	}
}

func ctxSetup(t *testing.T) (*nats.Conn, *ctxHandler) {
	srv := MustServer(t)
	nc := MustConn(t, srv)
	h := &ctxHandler{ended: make(chan error, 4)}
	MustServe(t, nc, "n1", h)
	return nc, h
}

// send publishes a request for function to a fresh inbox and returns the
// inbox's subscription.
func send(t *testing.T, nc *nats.Conn, function string, hdr ...string) (*nats.Subscription, string) {
	t.Helper()
	inbox := nc.NewRespInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	m := nats.NewMsg("pyfleet.req.p." + function)
	m.Reply, m.Data = inbox, []byte(`null`)
	m.Header.Set(protocol.HeaderTimeout, "20000")
	for i := 0; i+1 < len(hdr); i += 2 {
		m.Header.Set(hdr[i], hdr[i+1])
	}
	if err := nc.PublishMsg(m); err != nil {
		t.Fatal(err)
	}
	return sub, inbox
}

// TestProgressMessages: with Pyfleet-Progress each value comes to the reply
// subject, in order, before the answer; without it, only the answer.
func TestProgressMessages(t *testing.T) {
	nc, _ := ctxSetup(t)
	sub, _ := send(t, nc, "progress", protocol.HeaderProgress, "1", protocol.HeaderRequestID, "r-9")
	var values []string
	for {
		m, err := sub.NextMsg(10 * time.Second)
		if err != nil {
			t.Fatalf("after %v: %v", values, err)
		}
		if m.Header.Get(protocol.HeaderStream) != protocol.StreamProgress {
			if string(m.Data) != `"done"` {
				t.Errorf("answer %q", m.Data)
			}
			break
		}
		if m.Header.Get(protocol.HeaderRequestID) != "r-9" || m.Header.Get(protocol.HeaderNode) != "n1" {
			t.Errorf("progress headers %v", m.Header)
		}
		values = append(values, string(m.Data))
	}
	if want := []string{"0", "1", "2"}; len(values) != 3 || values[0] != want[0] || values[2] != want[2] {
		t.Errorf("progress %v, want %v", values, want)
	}

	for _, hdr := range [][]string{nil, {protocol.HeaderProgress, "0"}} {
		sub, _ := send(t, nc, "progress", hdr...)
		m, err := sub.NextMsg(10 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if string(m.Data) != `"done"` || m.Header.Get(protocol.HeaderStream) != "" {
			t.Errorf("headers %v: first message %q %v, want the plain answer", hdr, m.Data, m.Header)
		}
	}
}

// TestCancelCall: the reply subject published to <prefix>.cancel.call.<pool>
// cancels that call's context, and only that call's; its answer is 499.
func TestCancelCall(t *testing.T) {
	nc, h := ctxSetup(t)
	keep, keepInbox := send(t, nc, "wait")
	sub, inbox := send(t, nc, "wait")
	// A cancel for a reply subject no call has is ignored.
	if err := nc.Publish(protocol.Subjects{}.CancelCall("p"), []byte("_INBOX.nobody")); err != nil {
		t.Fatal(err)
	}
	// The cancel may beat the request to the node (two publishes, one
	// connection: in order, but handle runs the call on a goroutine):
	// send it until the call ends.
	var m *nats.Msg
	for m == nil {
		if err := nc.Publish(protocol.Subjects{}.CancelCall("p"), []byte(inbox)); err != nil {
			t.Fatal(err)
		}
		var err error
		if m, err = sub.NextMsg(100 * time.Millisecond); err != nil && !errors.Is(err, nats.ErrTimeout) {
			t.Fatal(err)
		}
	}
	wantError(t, m, call.CodeCancelled, call.TypeCancelled)
	if cause := <-h.ended; cause == nil || cause.Error() != "the caller cancelled the call" {
		t.Errorf("the handler's context ended by %v", cause)
	}
	if m, err := keep.NextMsg(200 * time.Millisecond); err == nil {
		t.Errorf("the other call answered %q %v: the cancel reached it", m.Data, m.Header)
	}
	if err := nc.Publish(protocol.Subjects{}.CancelCall("p"), []byte(keepInbox)); err != nil {
		t.Fatal(err)
	}
	m, err := keep.NextMsg(10 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	wantError(t, m, call.CodeCancelled, call.TypeCancelled)
}
