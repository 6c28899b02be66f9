package bus

import "testing"

func TestRedactURLs(t *testing.T) {
	got := redactURLs("nats://u:pw@h1:4222, tls://tok@h2,h3:4222")
	if want := "nats://***@h1:4222,tls://***@h2,h3:4222"; got != want {
		t.Errorf("redactURLs = %q, want %q", got, want)
	}
}

func TestHeaderValue(t *testing.T) {
	if got := headerValue("a\r\nb\x00c", 0); got != "a  b c" {
		t.Errorf("headerValue = %q", got)
	}
	if got := headerValue("ééé", 3); got != "é…" {
		t.Errorf("truncated = %q", got)
	}
}
