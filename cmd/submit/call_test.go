package main

import (
	"net"
	"strings"
	"testing"
)

func TestCall(t *testing.T) {
	s := mustServer(t)
	fakeNode(t, mustConn(t, s), "node-a")

	tests := []struct {
		name   string
		stdin  string
		args   []string
		code   int
		stdout string
		stderr string // substring; "" means stderr must be empty
	}{
		{"ok", "", []string{"call", "echo", `{"a": [1, 2]}`}, 0, "{\"a\": [1, 2]}\n", ""},
		{"no argument is null", "", []string{"call", "echo"}, 0, "null\n", ""},
		{"stdin", "  [1,2]\n", []string{"call", "echo", "-"}, 0, "[1,2]\n", ""},
		{"raw", "", []string{"call", "--raw", "echo", "not json"}, 0, "not json", ""},
		{"error", "", []string{"call", "fail"}, 1, "", "500 RuntimeError: this function always fails\n"},
		{"stream", "", []string{"call", "count", `{"n":3}`}, 0, "0\n1\n2\n", ""},
		{"empty stream", "", []string{"call", "count", `{"n":0}`}, 0, "", ""},
		{"stream error", "", []string{"call", "countfail"}, 1, "0\n1\n", "500 ValueError: boom\n"},
		{"node deadline", "", []string{"call", "late"}, 3, "", "408 DeadlineExceeded: deadline passed after 1000 ms\n"},
		{"no answer", "", []string{"call", "--timeout", "100ms", "silent"}, 3, "", "no answer from pyfleet.req.default.silent within 100ms"},
		{"node lost", "", []string{"call", "--timeout", "60s", "vanish"}, 3, "", "node node-a stopped answering while it held the call"},
		{"no responders", "", []string{"call", "--pool", "nobody", "echo"}, 3, "", "no node serves pyfleet.req.nobody.echo"},
		{"prefix", "", []string{"--prefix", "acme", "call", "echo"}, 3, "", "no node serves acme.req.default.echo"},
		{"global flag after command", "", []string{"call", "--prefix", "acme", "echo"}, 3, "", "no node serves acme.req.default.echo"},
		{"unknown node", "", []string{"call", "--node", "node-z", "echo"}, 3, "", "no node serves pyfleet.node.node-z.default.echo"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := submit(t, s, tt.stdin, tt.args...)
			r.want(t, tt.code, tt.stdout)
			if tt.stderr == "" && r.stderr != "" || !strings.Contains(r.stderr, tt.stderr) {
				t.Fatalf("stderr %q, want %q", r.stderr, tt.stderr)
			}
		})
	}
}

func TestCallSendsHeaders(t *testing.T) {
	s := mustServer(t)
	fakeNode(t, mustConn(t, s), "node-a")

	r := submit(t, s, "", "call", "--headers", "--session", "s1", "--timeout", "1500ms", "echo", "1")
	r.want(t, 0, "1\n")
	for _, h := range []string{"Fake-Session: s1\n", "Fake-Timeout: 1500\n", "Pyfleet-Node: node-a\n", "Pyfleet-Worker: w1\n"} {
		if !strings.Contains(r.stderr, h) {
			t.Errorf("stderr %q lacks %q", r.stderr, h)
		}
	}

	r = submit(t, s, "", "call", "--headers", "--node", "node-a", "echo")
	r.want(t, 0, "null\n")
	if !strings.Contains(r.stderr, "Fake-Subject: pyfleet.node.node-a.default.echo\n") {
		t.Errorf("--node did not address the node subject: %q", r.stderr)
	}
}

func TestCallCannotConnect(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	url := "nats://" + l.Addr().String()
	l.Close()

	r := submit(t, nil, "", "--nats", url, "call", "echo")
	r.want(t, 3, "")
	if !strings.Contains(r.stderr, "cannot connect to NATS at "+url) {
		t.Fatalf("stderr %q does not name the URL", r.stderr)
	}
}
