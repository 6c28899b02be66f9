package protocol_test

import (
	"testing"
	"time"

	"github.com/pyfleet/pyfleet/protocol"
)

func TestPriorities(t *testing.T) {
	s := protocol.Subjects{}
	for _, c := range []struct{ p, subject string }{
		{"", "pyfleet.job.pool.f"}, {"normal", "pyfleet.job.pool.f"}, {"high", "pyfleet.job.pool.f.high"}, {"low", "pyfleet.job.pool.f.low"},
	} {
		if err := protocol.ValidPriority(c.p); err != nil {
			t.Errorf("ValidPriority(%q): %v", c.p, err)
		}
		if got := s.JobPriority("pool", "f", c.p); got != c.subject {
			t.Errorf("JobPriority(%q) = %s, want %s", c.p, got, c.subject)
		}
	}
	if err := protocol.ValidPriority("urgent"); err == nil || err.Error() != `priority "urgent": want "high", "normal" or "low"` {
		t.Errorf("ValidPriority(urgent) = %v", err)
	}
	for _, c := range []struct{ rest, fn, p string }{
		{"f", "f", "normal"}, {"f.high", "f", "high"}, {"f.low", "f", "low"}, {"f.normal", "f.normal", "normal"},
		{"f.x", "f.x", "normal"}, {"f.high.x", "f.high.x", "normal"},
	} {
		if fn, p := protocol.SplitJobFunction(c.rest); fn != c.fn || p != c.p {
			t.Errorf("SplitJobFunction(%q) = %q, %q; want %q, %q", c.rest, fn, p, c.fn, c.p)
		}
	}
}

func TestParseRate(t *testing.T) {
	for _, c := range []struct {
		s    string
		want time.Duration
	}{
		{"100/s", 10 * time.Millisecond}, {"30/m", 2 * time.Second}, {"2/h", 30 * time.Minute}, {"0.5/s", 2 * time.Second}, {" 4 / s ", 250 * time.Millisecond},
	} {
		if got, err := protocol.ParseRate(c.s); err != nil || got != c.want {
			t.Errorf("ParseRate(%q) = %v, %v; want %v", c.s, got, err, c.want)
		}
	}
	for _, bad := range []string{"", "100", "100/d", "0/s", "-1/s", "x/s", "NaN/s", "Inf/s", "/s"} {
		if _, err := protocol.ParseRate(bad); err == nil {
			t.Errorf("ParseRate(%q): no error", bad)
		}
	}
	if got := protocol.RateBucket(""); got != "PYFLEET_RATE" {
		t.Errorf("RateBucket = %s", got)
	}
	if got := protocol.RateBucket("acme.jobs"); got != "ACME_JOBS_RATE" {
		t.Errorf("RateBucket(acme.jobs) = %s", got)
	}
}
