package testkit

import (
	"bufio"
	"net"
	"strings"
	"testing"
	"time"
)

// AssertPlainRefused speaks plain NATS to the TLS-only server at addr
// (host:port), as a client that knows no TLS would, and expects to be
// turned away.
func AssertPlainRefused(t testing.TB, addr string) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(c)
	info, err := r.ReadString('\n')
	if err != nil || !strings.Contains(info, `"tls_required":true`) {
		t.Fatalf("INFO %q (%v), want tls_required", info, err)
	}
	if _, err := c.Write([]byte("CONNECT {\"verbose\":false}\r\nPING\r\n")); err != nil {
		t.Fatal(err)
	}
	// The server expects a TLS handshake: plain text ends the connection
	// (or earns an -ERR first), never a PONG.
	if reply, err := r.ReadString('\n'); err == nil && !strings.HasPrefix(reply, "-ERR") {
		t.Fatalf("a plain client got %q: the server took it without TLS", reply)
	}
}
