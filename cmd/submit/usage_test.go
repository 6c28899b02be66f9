package main

import (
	"bytes"
	"strings"
	"testing"
)

// Usage errors are found before any connection, so these need no server.
func TestUsageErrors(t *testing.T) {
	tests := []struct {
		args   []string
		stderr string
	}{
		{[]string{}, "Usage:"},
		{[]string{"frobnicate"}, `unknown command "frobnicate"`},
		{[]string{"--bogus", "call"}, "flag provided but not defined: -bogus"},
		{[]string{"call", "--bogus", "echo"}, "flag provided but not defined: -bogus"},
		{[]string{"call"}, "missing FUNCTION"},
		{[]string{"call", "echo", "{oops"}, "argument is not valid JSON"},
		{[]string{"call", "echo", "hello"}, `a string needs quotes: '"hello"'`},
		{[]string{"call", "echo", "1", "--headers"}, `unexpected "--headers": flags go before FUNCTION`},
		{[]string{"call", "echo", "--headers"}, "flags go before FUNCTION"},
		{[]string{"call", "--pool", "a.b", "echo"}, `--pool "a.b" must be one subject token`},
		{[]string{"call", "my.fn"}, `FUNCTION "my.fn" must be one subject token`},
		{[]string{"call", "--timeout", "0s", "echo"}, "--timeout must be positive"},
		{[]string{"--prefix", "a.*", "call", "echo"}, "is not a subject prefix"},
		{[]string{"--nats-password", "x", "call", "echo"}, "--nats-password needs --nats-user"},
		{[]string{"--nats-creds", "/does/not/exist", "call", "echo"}, "--nats-creds"},
		{[]string{"job", "--id", "a b", "echo"}, `--id "a b" must be one subject token`},
		// The node's rule (protocol.ValidToken), stricter than dots and spaces.
		{[]string{"job", "--id", "a\x01b", "echo"}, "must not contain control or invalid characters"},
		{[]string{"call", "\xffecho"}, "must not contain control or invalid characters"},
		{[]string{"watch", "--kind", "crash"}, `unknown --kind "crash"; kinds: node_started`},
		{[]string{"watch", "extra"}, `unexpected argument "extra"`},
		{[]string{"nodes", "--wait", "0s"}, "--wait must be positive"},
		{[]string{"fns", "--wait", "0s"}, "--wait must be positive"},
		{[]string{"fns", "--pool", "a.b"}, `--pool "a.b" must be one subject token`},
		{[]string{"fns", "extra"}, `unexpected argument "extra"`},
		{[]string{"bench", "-n", "5", "--duration", "1s", "echo"}, "use -n or --duration, not both"},
		{[]string{"bench", "-c", "0", "echo"}, "-c must be positive"},
		{[]string{"help", "nosuch"}, `unknown command "nosuch"`},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			r := submit(t, nil, "", tt.args...)
			r.want(t, 2, "")
			if !strings.Contains(r.stderr, tt.stderr) {
				t.Fatalf("stderr %q lacks %q", r.stderr, tt.stderr)
			}
		})
	}
}

func TestHelp(t *testing.T) {
	for _, args := range [][]string{{"help"}, {"-h"}, {"--help"}} {
		r := submit(t, nil, "", args...)
		if r.code != 0 || !strings.Contains(r.stdout, "Commands:") || !strings.Contains(r.stdout, "--nats-creds FILE") {
			t.Fatalf("%v: exit %d, stdout %q", args, r.code, r.stdout)
		}
	}
	for _, cmd := range commands {
		for _, args := range [][]string{{"help", cmd.name}, {cmd.name, "-h"}} {
			r := submit(t, nil, "", args...)
			if r.code != 0 || !strings.HasPrefix(r.stdout, "Usage: submit "+cmd.name) {
				t.Fatalf("%v: exit %d, stdout %q", args, r.code, r.stdout)
			}
		}
	}
}

// run is what main calls; it must give the same answers as app.run.
func TestRun(t *testing.T) {
	var out, errb bytes.Buffer
	if code := run([]string{"help", "call"}, strings.NewReader(""), &out, &errb); code != 0 {
		t.Fatalf("exit %d, stderr %q", code, errb.String())
	}
	if !strings.Contains(out.String(), "--session SESSION") {
		t.Fatalf("stdout %q", out.String())
	}
}

func TestRedactURLs(t *testing.T) {
	got := redactURLs("nats://u:secret@h1:4222, nats://tok@h2:4222,nats://h3")
	if strings.Contains(got, "secret") || strings.Contains(got, "tok@") || !strings.Contains(got, "nats://h3") {
		t.Fatalf("got %q", got)
	}
}
