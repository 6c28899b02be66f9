package main

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/pyfleet/pyfleet/client"
)

// TestJobBar: a progress value with numeric done and total is a bar; any
// other is shown as it is beside the state.
func TestJobBar(t *testing.T) {
	for _, tc := range []struct {
		progress string
		attempts uint64
		want     string
	}{
		{`{"done":3,"total":10}`, 1, "\r[#########.....................]  30% 3/10  running\x1b[K"},
		{`{"done":12,"total":10,"step":"x"}`, 1, "\r[##############################] 100% 12/10  running\x1b[K"},
		{`"downloading"`, 2, "\rjob j1: running (attempt 2) \"downloading\"\x1b[K"},
		{``, 1, "\rjob j1: running\x1b[K"},
		{`{"done":1,"total":0}`, 1, "\rjob j1: running {\"done\":1,\"total\":0}\x1b[K"},
	} {
		info := &client.JobInfo{ID: "j1", State: "running", Attempts: tc.attempts, Progress: json.RawMessage(tc.progress)}
		if got := jobBar(info); got != tc.want {
			t.Errorf("progress %s: bar %q, want %q", tc.progress, got, tc.want)
		}
		if strings.Count(jobBar(info), "\n") != 0 {
			t.Errorf("progress %s: the bar spans lines", tc.progress)
		}
	}
}
