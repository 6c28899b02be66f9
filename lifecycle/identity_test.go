package lifecycle

import (
	"errors"
	"os"
	"testing"
)

func TestParseStat(t *testing.T) {
	for _, tc := range []struct {
		name, line string
		want       procStat
		err        bool
	}{
		{
			name: "plain",
			line: "123 (python3) S 1 123 123 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 100 18446744073709551615\n",
			want: procStat{pid: 123, state: 'S', ppid: 1, pgrp: 123, session: 123, startTime: 98765},
		},
		{
			name: "command name with spaces and parentheses",
			line: "42 (a) b (c) Z 7 8 9 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 555 0 0",
			want: procStat{pid: 42, state: 'Z', ppid: 7, pgrp: 8, session: 9, startTime: 555},
		},
		{name: "truncated", line: "42 (x) S 1 2 3", err: true},
		{name: "no parentheses", line: "42 x S 1 2 3", err: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseStat([]byte(tc.line))
			if tc.err {
				if !errors.Is(err, ErrBadProcStat) {
					t.Fatalf("err = %v, want ErrBadProcStat", err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("parseStat = %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

func TestIdentity(t *testing.T) {
	self, err := ReadIdentity(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if !self.Alive() {
		t.Fatalf("own identity %v not alive", self)
	}
	for name, id := range map[string]Identity{
		"wrong start time": {PID: self.PID, StartTime: self.StartTime + 1, BootID: self.BootID},
		"wrong boot":       {PID: self.PID, StartTime: self.StartTime, BootID: "not-this-boot"},
		"no pid":           {},
	} {
		if id.Alive() {
			t.Errorf("%s: %v alive", name, id)
		}
	}
	if _, err := ReadIdentity(1 << 30); !errors.Is(err, ErrNoProcess) {
		t.Errorf("ReadIdentity of a free pid: %v, want ErrNoProcess", err)
	}
}
