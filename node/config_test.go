package node

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func validConfig(t *testing.T) Config {
	t.Helper()
	c := Defaults()
	c.Python = testPython(t) // Validate starts it once: it must import pyfleet
	c.StateDir = t.TempDir()
	c.AppDir = t.TempDir()
	c.App = "app"
	c.Node = "n1"
	return c
}

func TestValidateRejectsBadSettingsByName(t *testing.T) {
	cases := []struct {
		name   string
		mod    func(*Config)
		naming string
	}{
		{"dotted node", func(c *Config) { c.Node = "a.b" }, "--node"},
		{"wildcard pool", func(c *Config) { c.Pool = "p*" }, "--pool"},
		{"bad prefix", func(c *Config) { c.Prefix = "a..b" }, "--prefix"},
		{"no workers", func(c *Config) { c.Workers = 0 }, "--workers"},
		{"no concurrency", func(c *Config) { c.Concurrency = 0 }, "--concurrency"},
		{"negative queue", func(c *Config) { c.QueueLimit = -1 }, "--queue-limit"},
		{"zero timeout", func(c *Config) { c.RequestTimeout = 0 }, "--request-timeout"},
		{"negative job timeout", func(c *Config) { c.JobTimeout = -time.Second }, "--job-timeout"},
		{"job timeout over max", func(c *Config) { c.JobTimeout = 2 * time.Hour }, "--job-timeout"},
		{"negative max requests", func(c *Config) { c.MaxRequests = -1 }, "--max-requests"},
		{"negative worker memory limit", func(c *Config) { c.WorkerMemoryLimitMB = -1 }, "--worker-memory-limit"},
		{"negative worker pids limit", func(c *Config) { c.WorkerPidsLimit = -1 }, "--worker-pids-limit"},
		{"no max deliver", func(c *Config) { c.MaxDeliver = 0 }, "--max-deliver"},
		{"missing interpreter", func(c *Config) { c.Python = "/no/such/python" }, "--python"},
		{"interpreter not on PATH", func(c *Config) { c.Python = "no-such-python-here" }, "--python"},
		{"app dir missing", func(c *Config) { c.AppDir = "/no/such/dir" }, "--app-dir"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := validConfig(t)
			tc.mod(&c)
			err := c.Validate()
			if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tc.naming) {
				t.Errorf("err %v, want ErrConfig naming %s", err, tc.naming)
			}
		})
	}
}

func TestValidateDerivesAppFromPyFile(t *testing.T) {
	c := validConfig(t)
	dir := t.TempDir()
	file := filepath.Join(dir, "myapp.py")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	c.App = file + ":api"
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if c.App != "myapp:api" || c.AppDir != dir {
		t.Errorf("app %q in %q, want myapp:api in %q", c.App, c.AppDir, dir)
	}
}

// TestValidateDefaultsJobTimeout: a job's default deadline is an hour, not
// --request-timeout (issue 13), and gives way to a lower --max-timeout.
func TestValidateDefaultsJobTimeout(t *testing.T) {
	for _, tc := range []struct{ max, want time.Duration }{{time.Hour, time.Hour}, {2 * time.Hour, time.Hour}, {2 * time.Minute, 2 * time.Minute}} {
		c := validConfig(t)
		c.MaxTimeout = tc.max
		if err := c.Validate(); err != nil {
			t.Fatal(err)
		}
		if c.JobTimeout != tc.want || c.RequestTimeout != time.Minute {
			t.Errorf("--max-timeout %v: job timeout %v, request timeout %v; want %v and 1m", tc.max, c.JobTimeout, c.RequestTimeout, tc.want)
		}
	}
}

func TestValidateDefaultsNodeName(t *testing.T) {
	c := validConfig(t)
	c.Node = ""
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if c.Node == "" || strings.ContainsAny(c.Node, ".*> ") {
		t.Errorf("default node name %q is not a subject token", c.Node)
	}
}

// TestValidateListen: an embedded server on anything but loopback needs
// credentials, and the refusal names --listen and the flags that fix it.
func TestValidateListen(t *testing.T) {
	pem := filepath.Join(t.TempDir(), "x.pem")
	if err := os.WriteFile(pem, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	refused := []struct {
		listen string
		mod    func(*Config)
	}{
		{"0.0.0.0:4222", nil},
		{"[::]:4222", nil},
		{"192.168.1.20:4222", nil},
		{"nats.example.com:4222", nil},
		{":4222", nil},
		{"0.0.0.0:4222", func(c *Config) { c.NATSUser = "u" }},                       // no password
		{"0.0.0.0:4222", func(c *Config) { c.NATSTLSCA = pem }},                      // a CA with no server certificate
		{"0.0.0.0:4222", func(c *Config) { c.NATSTLSCert, c.NATSTLSKey = pem, pem }}, // TLS, but anyone may connect
	}
	for _, tc := range refused {
		c := validConfig(t)
		c.Listen = tc.listen
		if tc.mod != nil {
			tc.mod(&c)
		}
		err := c.Validate()
		if !errors.Is(err, ErrConfig) {
			t.Errorf("--listen %s: %v, want ErrConfig", tc.listen, err)
			continue
		}
		for _, want := range []string{"--listen", tc.listen, "--nats-user", "--nats-password", "--nats-token"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("--listen %s: %q does not name %s", tc.listen, err, want)
			}
		}
	}

	allowed := []struct {
		listen string
		mod    func(*Config)
	}{
		{"127.0.0.1:4222", nil},
		{"127.3.2.1:0", nil},
		{"[::1]:4222", nil},
		{"localhost:4222", nil},
		{"0.0.0.0:4222", func(c *Config) { c.NATSToken = "t" }},
		{"10.1.2.3:4222", func(c *Config) { c.NATSUser, c.NATSPassword = "u", "p" }},
		{"0.0.0.0:4222", func(c *Config) { c.NATSTLSCA, c.NATSTLSCert, c.NATSTLSKey = pem, pem, pem }},
		// --listen is not used when --nats is given.
		{"0.0.0.0:4222", func(c *Config) { c.NATS = "nats://127.0.0.1:4222" }},
	}
	for _, tc := range allowed {
		c := validConfig(t)
		c.Listen = tc.listen
		if tc.mod != nil {
			tc.mod(&c)
		}
		if err := c.Validate(); err != nil {
			t.Errorf("--listen %s: %v", tc.listen, err)
		}
	}

	c := validConfig(t)
	c.Listen, c.NATSToken = ":4222", "t"
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "0.0.0.0") {
		t.Errorf("empty host with a token: %v, want a hint to write 0.0.0.0", err)
	}
}

// TestValidateNATSURLs: URLs no wait could make work, and missing files,
// are configuration errors at once.
func TestValidateNATSURLs(t *testing.T) {
	for _, bad := range []struct{ url, naming string }{
		{"http://127.0.0.1:4222", `scheme "http"`},
		{"nats://", "no host"},
		{"nats://127.0.0.1:99999", "port"},
		{"nats://127.0.0.1:4222,,nats://b:4222", "empty URL"},
		{"nats://u:hunter2@%zz:4222", "not a URL"},
	} {
		c := validConfig(t)
		c.NATS = bad.url
		err := c.Validate()
		if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), "--nats") || !strings.Contains(err.Error(), bad.naming) {
			t.Errorf("--nats %s: %v, want ErrConfig naming --nats and %s", bad.url, err, bad.naming)
		}
		if err != nil && strings.Contains(err.Error(), "hunter2") {
			t.Errorf("password in %v", err)
		}
	}
	for _, good := range []string{"nats://127.0.0.1:4222", "tls://a.example:4443,nats://b", "127.0.0.1:4222", "ws://h:8080", "nats://u:p@h"} {
		c := validConfig(t)
		c.NATS = good
		if err := c.Validate(); err != nil {
			t.Errorf("--nats %s: %v", good, err)
		}
	}
	for _, flag := range []string{"--nats-creds", "--nats-tls-ca", "--nats-tls-cert", "--nats-tls-key"} {
		c := validConfig(t)
		c.NATS = "nats://127.0.0.1:4222"
		missing := "/no/such/file-for" + flag
		switch flag {
		case "--nats-creds":
			c.NATSCreds = missing
		case "--nats-tls-ca":
			c.NATSTLSCA = missing
		case "--nats-tls-cert":
			c.NATSTLSCert = missing
		case "--nats-tls-key":
			c.NATSTLSKey = missing
		}
		if err := c.Validate(); !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), flag) || !strings.Contains(err.Error(), missing) {
			t.Errorf("missing %s: %v", flag, err)
		}
	}
}
