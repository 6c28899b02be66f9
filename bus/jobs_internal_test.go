package bus

import (
	"fmt"
	"testing"

	"github.com/nats-io/nats.go/jetstream"
)

// TestRefusal: only what a stream would answer again is a refusal; a store
// closed while the stream moves (a cluster failover) is sent again.
func TestRefusal(t *testing.T) {
	api := func(code jetstream.ErrorCode, d string) error {
		return fmt.Errorf("nats: %w", &jetstream.APIError{Code: 503, ErrorCode: code, Description: d})
	}
	for _, c := range []struct {
		err      error
		refused  bool
		tooLarge bool
	}{
		{api(10077, "maximum messages exceeded"), true, false},
		{api(10077, "maximum bytes exceeded"), true, false},
		{api(10077, "maximum messages per subject exceeded"), true, false},
		{api(10077, "message too large"), true, true},
		{api(10054, "message size exceeds maximum allowed"), true, true},
		{api(10002, "resource limits exceeded for account"), true, false},
		{api(10077, "store is closed"), false, false},
		{api(10008, "JetStream system temporarily unavailable"), false, false},
		{jetstream.ErrNoStreamResponse, false, false},
		{nil, false, false},
	} {
		r := refusal(c.err, nil)
		if (r != nil) != c.refused || (r != nil && r.tooLarge != c.tooLarge) {
			t.Errorf("refusal(%v) = %+v, want refused %v, too large %v", c.err, r, c.refused, c.tooLarge)
		}
	}
}
