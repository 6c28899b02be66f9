package node

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func validConfig(t *testing.T) Config {
	t.Helper()
	c := Defaults()
	c.Python = "/bin/sh" // any executable: Validate checks it exists and runs
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
		{"negative max requests", func(c *Config) { c.MaxRequests = -1 }, "--max-requests"},
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
