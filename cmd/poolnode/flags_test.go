package main

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/pyfleet/pyfleet/node"
)

// fakeEnv is a lookupEnv over vars that records every name looked up, so no
// test touches the process environment.
type fakeEnv struct {
	vars   map[string]string
	looked map[string]bool
}

func newFakeEnv(vars map[string]string) *fakeEnv {
	return &fakeEnv{vars: vars, looked: map[string]bool{}}
}

func (e *fakeEnv) lookup(name string) (string, bool) {
	e.looked[name] = true
	v, ok := e.vars[name]
	return v, ok
}

// writeConfig writes a YAML config file in a fresh temporary directory.
func writeConfig(t *testing.T, yaml string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "poolnode.yaml")
	if err := os.WriteFile(path, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// fileMarker in args or env stands for the path of the case's config file.
const fileMarker = "@FILE"

func withFile(s, path string) string { return strings.ReplaceAll(s, fileMarker, path) }

func TestParseConfig(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		env  map[string]string
		file string // YAML; written to a file when not empty
		want func(*node.Config, *logOptions)
	}{
		{
			name: "defaults",
			want: func(*node.Config, *logOptions) {},
		},
		{
			name: "file only",
			args: []string{"--config", fileMarker},
			file: "pool: from-file\nnats: nats://a:4222,nats://b:4222\nlog-level: debug\n",
			want: func(c *node.Config, l *logOptions) {
				c.Pool = "from-file"
				c.NATS = "nats://a:4222,nats://b:4222"
				l.level = "debug"
			},
		},
		{
			name: "env over file",
			args: []string{"--config", fileMarker},
			env:  map[string]string{"PYFLEET_POOL": "from-env"},
			file: "pool: from-file\nnode: file-node\n",
			want: func(c *node.Config, _ *logOptions) {
				c.Pool = "from-env"
				c.Node = "file-node" // the file still fills what env leaves unset
			},
		},
		{
			name: "flag over env over file",
			args: []string{"--pool", "from-flag", "--config", fileMarker},
			env:  map[string]string{"PYFLEET_POOL": "from-env", "PYFLEET_NODE": "env-node"},
			file: "pool: from-file\nnode: file-node\nprefix: fileprefix\n",
			want: func(c *node.Config, _ *logOptions) {
				c.Pool = "from-flag"
				c.Node = "env-node"
				c.Prefix = "fileprefix"
			},
		},
		{
			name: "flag=value form",
			args: []string{"--workers=3", "-pool=p"},
			env:  map[string]string{"PYFLEET_WORKERS": "9"},
			want: func(c *node.Config, _ *logOptions) {
				c.Workers = 3
				c.Pool = "p"
			},
		},
		{
			name: "a flag hides a bad env value: it is not even parsed",
			args: []string{"--workers", "2"},
			env:  map[string]string{"PYFLEET_WORKERS": "many"},
			want: func(c *node.Config, _ *logOptions) { c.Workers = 2 },
		},
		{
			name: "env hides a bad file value",
			args: []string{"--config", fileMarker},
			env:  map[string]string{"PYFLEET_REQUEST_TIMEOUT": "5s"},
			file: "request-timeout: soon\n",
			want: func(c *node.Config, _ *logOptions) { c.RequestTimeout = 5 * time.Second },
		},
		{
			name: "PYFLEET_CONFIG names the file",
			env:  map[string]string{"PYFLEET_CONFIG": fileMarker},
			file: "pool: via-env-config\n",
			want: func(c *node.Config, _ *logOptions) { c.Pool = "via-env-config" },
		},
		{
			name: "--config wins over PYFLEET_CONFIG",
			args: []string{"--config", fileMarker},
			env:  map[string]string{"PYFLEET_CONFIG": "/nonexistent/poolnode.yaml"},
			file: "pool: via-flag-config\n",
			want: func(c *node.Config, _ *logOptions) { c.Pool = "via-flag-config" },
		},
		{
			name: "durations and ints from env",
			env: map[string]string{
				"PYFLEET_REQUEST_TIMEOUT": "1m30s",
				"PYFLEET_SHUTDOWN_GRACE":  "250ms",
				"PYFLEET_MAX_AGE":         "2h",
				"PYFLEET_WORKERS":         "7",
				"PYFLEET_CONCURRENCY":     "4",
				"PYFLEET_QUEUE_LIMIT":     "0",
				"PYFLEET_MAX_REQUESTS":    "1000",
				"PYFLEET_MAX_MEMORY":      "512",
				"PYFLEET_MAX_DELIVER":     "9",
			},
			want: func(c *node.Config, _ *logOptions) {
				c.RequestTimeout = 90 * time.Second
				c.ShutdownGrace = 250 * time.Millisecond
				c.MaxAge = 2 * time.Hour
				c.Workers = 7
				c.Concurrency = 4
				c.QueueLimit = 0
				c.MaxRequests = 1000
				c.MaxMemoryMB = 512
				c.MaxDeliver = 9
			},
		},
		{
			name: "durations and ints from the file",
			args: []string{"--config", fileMarker},
			file: `# a comment
request-timeout: 1m30s
shutdown-grace: "250ms"
max-age: 2h
workers: 7
concurrency: 4
queue-limit: 0
max-requests: 1000
max-memory: 512
max-deliver: 9
`,
			want: func(c *node.Config, _ *logOptions) {
				c.RequestTimeout = 90 * time.Second
				c.ShutdownGrace = 250 * time.Millisecond
				c.MaxAge = 2 * time.Hour
				c.Workers = 7
				c.Concurrency = 4
				c.QueueLimit = 0
				c.MaxRequests = 1000
				c.MaxMemoryMB = 512
				c.MaxDeliver = 9
			},
		},
		{
			name: "- becomes _ in env names",
			env: map[string]string{
				"PYFLEET_APP_DIR":       "/srv/app",
				"PYFLEET_STATE_DIR":     "/var/lib/pyfleet",
				"PYFLEET_NATS_TLS_CA":   "/etc/ca.pem",
				"PYFLEET_NATS_PASSWORD": "s3cret",
				"PYFLEET_LOG_LEVEL":     "warn",
				"PYFLEET_LOG_FORMAT":    "json",
			},
			want: func(c *node.Config, l *logOptions) {
				c.AppDir = "/srv/app"
				c.StateDir = "/var/lib/pyfleet"
				c.NATSTLSCA = "/etc/ca.pem"
				c.NATSPassword = "s3cret"
				l.level = "warn"
				l.format = "json"
			},
		},
		{
			name: "every flag name is a file key",
			args: []string{"--config", fileMarker},
			file: `nats: nats://n:4222
listen: 127.0.0.1:0
prefix: px
pool: pl
node: nd
app: mod:attr
app-dir: /a
python: /usr/bin/python3
workers: 2
concurrency: 3
queue-limit: 4
queue-limit-bytes: 11
max-sessions: 12
request-timeout: 5s
max-timeout: 2h
max-result-bytes: 13
connect-wait: 14s
shutdown-grace: 6s
max-requests: 7
max-memory: 8
max-age: 9s
max-deliver: 10
stream-replicas: 3
metrics: 127.0.0.1:9100
containment: group
worker-memory-limit: 15
worker-pids-limit: 16
state-dir: /s
log-level: error
log-format: console
nats-creds: /c
nats-user: u
nats-password: pw
nats-token: tk
nats-tls-ca: /ca
nats-tls-cert: /cert
nats-tls-key: /key
`,
			want: func(c *node.Config, l *logOptions) {
				*c = node.Config{
					NATS: "nats://n:4222", Listen: "127.0.0.1:0", Prefix: "px", Pool: "pl", Node: "nd",
					App: "mod:attr", AppDir: "/a", Python: "/usr/bin/python3",
					Workers: 2, Concurrency: 3, QueueLimit: 4, QueueLimitBytes: 11, MaxSessions: 12,
					RequestTimeout: 5 * time.Second, MaxTimeout: 2 * time.Hour, ShutdownGrace: 6 * time.Second,
					MaxResultBytes: 13, ConnectWait: 14 * time.Second,
					MaxDeliver: 10, StreamReplicas: 3, Metrics: "127.0.0.1:9100", StateDir: "/s", Containment: "group",
					WorkerMemoryLimitMB: 15, WorkerPidsLimit: 16,
					MaxRequests: 7, MaxMemoryMB: 8, MaxAge: 9 * time.Second,
					NATSCreds: "/c", NATSUser: "u", NATSPassword: "pw", NATSToken: "tk",
					NATSTLSCA: "/ca", NATSTLSCert: "/cert", NATSTLSKey: "/key",
				}
				*l = logOptions{level: "error", format: "console"}
			},
		},
		{
			name: "a null value in the file is no value",
			args: []string{"--config", fileMarker},
			file: "pool: ~\nnode:\n",
			want: func(*node.Config, *logOptions) {},
		},
		{
			name: "an empty file",
			args: []string{"--config", fileMarker},
			file: "# nothing yet\n",
			want: func(*node.Config, *logOptions) {},
		},
		{
			name: "an empty env value is a value",
			args: []string{"--config", fileMarker},
			env:  map[string]string{"PYFLEET_NATS": ""},
			file: "nats: nats://from-file:4222\n",
			want: func(c *node.Config, _ *logOptions) { c.NATS = "" },
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := ""
			if tc.file != "" {
				path = writeConfig(t, tc.file)
			}
			args := make([]string, len(tc.args))
			for i, a := range tc.args {
				args[i] = withFile(a, path)
			}
			vars := map[string]string{}
			for k, v := range tc.env {
				vars[k] = withFile(v, path)
			}
			var stderr bytes.Buffer
			cfg, logOpts, err := parseConfig(args, newFakeEnv(vars).lookup, &stderr)
			if err != nil {
				t.Fatalf("parseConfig: %v", err)
			}
			wantCfg, wantLog := node.Defaults(), logOptions{level: "info"}
			tc.want(&wantCfg, &wantLog)
			if !reflect.DeepEqual(cfg, wantCfg) {
				t.Errorf("config:\n got %+v\nwant %+v", cfg, wantCfg)
			}
			if logOpts != wantLog {
				t.Errorf("log options: got %+v, want %+v", logOpts, wantLog)
			}
			if stderr.Len() != 0 {
				t.Errorf("stderr: %q", stderr.String())
			}
		})
	}
}

func TestParseConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		env  map[string]string
		file string
		want []string // each must be in the error; fileMarker stands for the path
		not  []string // none may be
	}{
		{
			name: "unknown key in the file",
			args: []string{"--config", fileMarker},
			file: "pool: p\nworkerz: 4\n",
			want: []string{fileMarker, `"workerz"`, "unknown key"},
		},
		{
			name: "every unknown key is named",
			args: []string{"--config", fileMarker},
			file: "bogus: 1\npool: p\nnats_url: x\n",
			want: []string{`"bogus"`, `"nats_url"`},
			not:  []string{`"pool"`},
		},
		{
			name: "config is not a key of the file",
			args: []string{"--config", fileMarker},
			file: "config: other.yaml\n",
			want: []string{`"config"`, "unknown key"},
		},
		{
			name: "unknown key in a file named by PYFLEET_CONFIG",
			env:  map[string]string{"PYFLEET_CONFIG": fileMarker},
			file: "poool: p\n",
			want: []string{fileMarker, `"poool"`},
		},
		{
			name: "bad int in env names the variable",
			env:  map[string]string{"PYFLEET_WORKERS": "many"},
			want: []string{"PYFLEET_WORKERS", `"many"`},
		},
		{
			name: "bad duration in env names the variable",
			env:  map[string]string{"PYFLEET_REQUEST_TIMEOUT": "soon"},
			want: []string{"PYFLEET_REQUEST_TIMEOUT", `"soon"`},
		},
		{
			name: "bad int in the file names the file and key",
			args: []string{"--config", fileMarker},
			file: "workers: many\n",
			want: []string{fileMarker, `"workers"`},
		},
		{
			name: "a duration without a unit in the file names the file and key",
			args: []string{"--config", fileMarker},
			file: "request-timeout: 60\n",
			want: []string{fileMarker, `"request-timeout"`},
		},
		{
			name: "a fraction for an int in the file",
			args: []string{"--config", fileMarker},
			file: "max-deliver: 2.5\n",
			want: []string{fileMarker, `"max-deliver"`},
		},
		{
			name: "every bad value is reported, env and file",
			args: []string{"--config", fileMarker},
			env:  map[string]string{"PYFLEET_CONCURRENCY": "x"},
			file: "max-age: forever\n",
			want: []string{"PYFLEET_CONCURRENCY", fileMarker, `"max-age"`},
		},
		{
			name: "a nested mapping in the file",
			args: []string{"--config", fileMarker},
			file: "nats:\n  url: nats://a:4222\n",
			want: []string{fileMarker, `"nats"`, "single value"},
		},
		{
			name: "a list in the file",
			args: []string{"--config", fileMarker},
			file: "nats: [nats://a:4222, nats://b:4222]\n",
			want: []string{fileMarker, `"nats"`, "single value"},
		},
		{
			name: "a file that is not a mapping",
			args: []string{"--config", fileMarker},
			file: "- pool\n- p\n",
			want: []string{fileMarker},
		},
		{
			name: "malformed YAML",
			args: []string{"--config", fileMarker},
			file: "pool: [p\n",
			want: []string{fileMarker},
		},
		{
			name: "a missing config file",
			args: []string{"--config", "/nonexistent/poolnode.yaml"},
			want: []string{"/nonexistent/poolnode.yaml"},
		},
		{
			name: "a missing file named by PYFLEET_CONFIG",
			env:  map[string]string{"PYFLEET_CONFIG": "/nonexistent/env.yaml"},
			want: []string{"/nonexistent/env.yaml"},
		},
		{
			name: "a positional argument",
			args: []string{"serve"},
			want: []string{`"serve"`, "unexpected argument"},
		},
		{
			name: "a positional argument after flags",
			args: []string{"--pool", "p", "extra", "--node", "n"},
			want: []string{`"extra"`, "unexpected argument"},
		},
		{
			name: "an unknown flag",
			args: []string{"--wrokers", "4"},
			want: []string{"wrokers"},
		},
		{
			name: "a bad flag value",
			args: []string{"--max-age", "old"},
			want: []string{"max-age"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := ""
			if tc.file != "" {
				path = writeConfig(t, tc.file)
			}
			args := make([]string, len(tc.args))
			for i, a := range tc.args {
				args[i] = withFile(a, path)
			}
			vars := map[string]string{}
			for k, v := range tc.env {
				vars[k] = withFile(v, path)
			}
			var stderr bytes.Buffer
			_, _, err := parseConfig(args, newFakeEnv(vars).lookup, &stderr)
			if err == nil {
				t.Fatalf("parseConfig succeeded, want an error with %q", tc.want)
			}
			if errors.Is(err, errHelp) {
				t.Fatalf("parseConfig = errHelp, want an error with %q", tc.want)
			}
			for _, w := range tc.want {
				if w = withFile(w, path); !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
			for _, n := range tc.not {
				if strings.Contains(err.Error(), n) {
					t.Errorf("error %q contains %q", err, n)
				}
			}
		})
	}
}

func TestParseConfigHelp(t *testing.T) {
	for _, arg := range []string{"-h", "--help", "-help"} {
		t.Run(arg, func(t *testing.T) {
			var stderr bytes.Buffer
			_, _, err := parseConfig([]string{"--pool", "p", arg}, newFakeEnv(nil).lookup, &stderr)
			if !errors.Is(err, errHelp) {
				t.Fatalf("parseConfig(%s) = %v, want errHelp", arg, err)
			}
			for _, w := range []string{"Usage: poolnode", "PYFLEET_<FLAG>", "-workers", "-config"} {
				if !strings.Contains(stderr.String(), w) {
					t.Errorf("usage does not mention %q:\n%s", w, stderr.String())
				}
			}
		})
	}
}

// TestEveryFlagReadsItsEnv checks that each flag is looked up as
// PYFLEET_<FLAG> and that nothing else in the environment is read.
func TestEveryFlagReadsItsEnv(t *testing.T) {
	env := newFakeEnv(nil)
	if _, _, err := parseConfig(nil, env.lookup, &bytes.Buffer{}); err != nil {
		t.Fatal(err)
	}
	var looked []string
	for name := range env.looked {
		looked = append(looked, name)
	}
	sort.Strings(looked)
	want := []string{
		"PYFLEET_APP", "PYFLEET_APP_DIR", "PYFLEET_CONCURRENCY", "PYFLEET_CONFIG",
		"PYFLEET_LISTEN", "PYFLEET_LOG_FORMAT", "PYFLEET_LOG_LEVEL",
		"PYFLEET_MAX_AGE", "PYFLEET_MAX_DELIVER", "PYFLEET_MAX_MEMORY", "PYFLEET_MAX_REQUESTS",
		"PYFLEET_NATS", "PYFLEET_NATS_CREDS", "PYFLEET_NATS_PASSWORD", "PYFLEET_NATS_TLS_CA",
		"PYFLEET_NATS_TLS_CERT", "PYFLEET_NATS_TLS_KEY", "PYFLEET_NATS_TOKEN", "PYFLEET_NATS_USER",
		"PYFLEET_NODE", "PYFLEET_POOL", "PYFLEET_PREFIX", "PYFLEET_PYTHON",
		"PYFLEET_QUEUE_LIMIT", "PYFLEET_REQUEST_TIMEOUT", "PYFLEET_SHUTDOWN_GRACE",
		"PYFLEET_STATE_DIR", "PYFLEET_WORKERS",
	}
	// Flags added later must read their variable too: every name looked up
	// must be one of these or a new PYFLEET_ one, and each of these must be.
	for _, name := range looked {
		if !strings.HasPrefix(name, "PYFLEET_") || strings.ContainsAny(name, "-abcdefghijklmnopqrstuvwxyz") {
			t.Errorf("looked up %q: want PYFLEET_ and an upper-case flag name", name)
		}
	}
	for _, name := range want {
		if !env.looked[name] {
			t.Errorf("%s was not looked up", name)
		}
	}
}

// TestConfigFileKeepsStringsVerbatim shows a bug in readConfigFile: values
// are decoded into `any` and turned back into text with fmt.Sprint, so an
// unquoted scalar that YAML reads as a number or a date reaches a string
// setting changed. Unskip once flags.go keeps each scalar's source text
// (decode into yaml.Node and use Node.Value).
func TestConfigFileKeepsStringsVerbatim(t *testing.T) {
	for _, tc := range []struct{ yaml, want string }{
		{"nats-password: 0123\n", "0123"},                                         // read as octal: 83
		{"nats-password: 123456789012345678901234\n", "123456789012345678901234"}, // 1.2345678901234569e+23
		{"nats-password: 2024-01-02\n", "2024-01-02"},                             // 2024-01-02 00:00:00 +0000 UTC
		{"nats-password: 1e3\n", "1e3"},                                           // 1000
		{"nats-password: 1.10\n", "1.10"},                                         // 1.1
	} {
		path := writeConfig(t, tc.yaml)
		cfg, _, err := parseConfig([]string{"--config", path}, newFakeEnv(nil).lookup, &bytes.Buffer{})
		if err != nil {
			t.Fatalf("%q: %v", tc.yaml, err)
		}
		if cfg.NATSPassword != tc.want {
			t.Errorf("%q: nats-password = %q, want %q", tc.yaml, cfg.NATSPassword, tc.want)
		}
	}
}
