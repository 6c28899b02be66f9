package protocol_test

import (
	"strings"
	"testing"

	"github.com/pyfleet/pyfleet/protocol"
)

func TestCronPattern(t *testing.T) {
	for in, want := range map[string]string{
		"*/5 * * * *":      "0 */5 * * * *",
		" 30 2 * * 1-5 ":   "0 30 2 * * 1-5",
		"*/10 * * * * *":   "*/10 * * * * *",
		"@every 90s":       "@every 1m30s",
		"@every 1h":        "@every 1h0m0s",
		"@hourly":          "@hourly",
		"@daily":           "@daily",
		"0 0 12 1 JAN MON": "0 0 12 1 JAN MON",
	} {
		if got, err := protocol.CronPattern(in); err != nil || got != want {
			t.Errorf("CronPattern(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for in, want := range map[string]string{
		"":              "empty schedule",
		"* * *":         `cron "* * *": 3 fields`,
		"* * * * * * *": "7 fields",
		"@every 500ms":  "at least 1s",
		"@every soon":   `cron "@every soon"`,
		"@fortnightly":  "unknown macro",
	} {
		if _, err := protocol.CronPattern(in); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("CronPattern(%q): %v, want an error containing %q", in, err, want)
		}
	}
}

func TestScheduleSubjects(t *testing.T) {
	s := protocol.Subjects{Prefix: "acme.pf"}
	if got := s.ScheduleAt("p", "j1"); got != "acme.pf.sched.p.at.j1" {
		t.Error(got)
	}
	if got := s.ScheduleCron("p", "nightly"); got != "acme.pf.sched.p.cron.nightly" {
		t.Error(got)
	}
}
