package client

import (
	"context"
	"errors"
	"testing"

	"github.com/nats-io/nats.go"
)

// A call's inbox holds at most maxBuffered bytes unread: a reader that
// keeps up never meets the bound, one that does not is told, and what
// arrives after is dropped rather than kept.
func TestInboxBoundedInBytes(t *testing.T) {
	chunk := make([]byte, 1<<20)
	newBox := func() (*mux, *inbox) {
		ib := &inbox{token: "1", ready: make(chan struct{}, 1)}
		return &mux{prefix: "in.", boxes: map[string]*inbox{"1": ib}}, ib
	}
	ctx := context.Background()

	m, ib := newBox()
	for range 2 * maxBuffered / len(chunk) {
		m.deliver(&nats.Msg{Subject: "in.1", Data: chunk})
		if _, err := ib.wait(ctx, nil); err != nil {
			t.Fatalf("a reader that keeps up: %v", err)
		}
	}

	m, ib = newBox()
	for range maxBuffered/len(chunk) + 1 {
		m.deliver(&nats.Msg{Subject: "in.1", Data: chunk})
	}
	if _, err := ib.wait(ctx, nil); !errors.Is(err, errOverflow) {
		t.Fatalf("past %d bytes unread: wait = %v, want errOverflow", maxBuffered, err)
	}
	m.deliver(&nats.Msg{Subject: "in.1", Data: chunk})
	if len(ib.msgs) != 0 || ib.buffered != 0 {
		t.Errorf("after the overflow the inbox still holds %d messages, %d bytes", len(ib.msgs), ib.buffered)
	}
}
