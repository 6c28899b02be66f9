package bus

import (
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/protocol"
)

var benchFn = &call.Function{Name: "echo"}

var benchPayload = []byte(`{"message":"` + strings.Repeat("x", 100-len(`{"message":"","n":1}`)) + `","n":1}`)

// BenchmarkAdmit is the checks of one request with the headers the Go
// client sends (a timeout and a request id).
func BenchmarkAdmit(b *testing.B) {
	l := admitLimits{defaultTimeout: time.Minute, maxTimeout: time.Hour, maxBytes: 1 << 20}
	hdr := nats.Header{protocol.HeaderTimeout: {"30000"}, protocol.HeaderRequestID: {"0123456789abcdef"}}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := admit(l, hdr, "echo", benchFn, benchPayload); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkReplyHeader is the headers of one ok reply, and their encoding
// as nats.go sends them.
func BenchmarkReplyHeader(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		h := replyHeader(protocol.StatusOK, "node-1", "node-1-w3", "0123456789abcdef")
		if len(h) != 4 {
			b.Fatal(h)
		}
	}
}
