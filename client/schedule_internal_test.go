package client

import "testing"

func TestOlderThan(t *testing.T) {
	for _, tc := range []struct {
		v    string
		want bool
	}{
		{"2.11.9", true}, {"2.10.22", true}, {"1.99.0", true},
		{"2.12.0", false}, {"2.12.0-RC.1", false}, {"2.15.2", false}, {"3.0.0", false},
		{"", false}, {"unknown", false},
	} {
		if got := olderThan(tc.v, "2.12.0"); got != tc.want {
			t.Errorf("olderThan(%q, 2.12.0) = %v", tc.v, got)
		}
	}
}
