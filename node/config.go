package node

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/pyfleet/pyfleet/bus"
	"github.com/pyfleet/pyfleet/lifecycle"
	"github.com/pyfleet/pyfleet/protocol"
)

// Config is everything a node needs; cmd/poolnode fills it from flags,
// environment and a config file. Validate is the one place it is checked.
type Config struct {
	NATS   string // server URLs, comma separated; empty runs an embedded server
	Listen string // the embedded server's client address
	Prefix string // subject prefix
	Pool   string
	Node   string

	App    string // MODULE[:ATTR], or a path to a .py file
	AppDir string
	Python string
	// PythonFrom is which rule chose Python (PythonFromFlag, ...), set by
	// Validate.
	PythonFrom string

	Workers        int
	Concurrency    int
	QueueLimit     int
	RequestTimeout time.Duration
	// JobTimeout is the deadline of a job that names none, counted from
	// its start. It is apart from RequestTimeout because a job is the
	// long-running kind of work: a caller waits on a call, nobody on a job.
	// 0 means DefaultJobTimeout, held to MaxTimeout (Validate fills it).
	JobTimeout time.Duration
	// MaxTimeout caps the Pyfleet-Timeout a request or job may ask for.
	MaxTimeout    time.Duration
	ShutdownGrace time.Duration
	// QueueLimitBytes caps the payload bytes of calls waiting for a worker.
	QueueLimitBytes int64
	// MaxSessions caps the sessions a node remembers at once.
	MaxSessions int
	// MaxResultBytes caps a job's result, streamed chunks included; 0 is
	// the NATS max payload.
	MaxResultBytes int
	// ConnectWait is how long a node retries a NATS server that is not up.
	ConnectWait    time.Duration
	MaxDeliver     int
	StreamReplicas int
	StateDir       string

	// Recycling limits; zero is off.
	MaxRequests int
	MaxMemoryMB int
	MaxAge      time.Duration

	Metrics string // address for /metrics and /healthz; empty: off

	// Containment is lifecycle.ModeAuto, ModeCgroup, ModePIDNS or ModeGroup.
	Containment string
	// Hard limits on each worker's whole tree (0: none), enforced by the
	// kernel; they need a containment with the controller (cgroup).
	WorkerMemoryLimitMB int
	WorkerPidsLimit     int
	// Preload forks workers from a template that imported the app once
	// (README "Preloaded workers"); off by default.
	Preload bool

	NATSCreds, NATSUser, NATSPassword, NATSToken string
	NATSTLSCA, NATSTLSCert, NATSTLSKey           string

	// deferImportCheck makes Validate start the interpreter's check that
	// it imports pyfleet (probePython) and leave it running as importCheck,
	// for Run to wait for only before the first worker starts: with
	// --preload the check then runs beside the template's own import of
	// the same modules instead of before it (python.go).
	deferImportCheck bool
	importCheck      *importCheck
}

// DefaultJobTimeout is the deadline of a job that names none (--job-timeout).
const DefaultJobTimeout = time.Hour

// ErrConfig marks a bad flag, config value, interpreter or app: the node
// exits with status 2 and does not retry.
var ErrConfig = errors.New("bad configuration")

// Defaults returns the documented defaults (README.md, "poolnode").
func Defaults() Config {
	return Config{
		Listen:          "127.0.0.1:4222",
		Prefix:          "pyfleet",
		Pool:            "default",
		AppDir:          ".",
		Workers:         runtime.NumCPU(),
		Concurrency:     1,
		QueueLimit:      1000,
		RequestTimeout:  60 * time.Second,
		MaxTimeout:      time.Hour,
		ShutdownGrace:   10 * time.Second,
		QueueLimitBytes: 256 << 20,
		MaxSessions:     10_000,
		ConnectWait:     30 * time.Second,
		MaxDeliver:      5,
		StreamReplicas:  1,
	}
}

// Validate checks c and fills what it derives (node name, interpreter, app
// location, state dir). Errors wrap ErrConfig and name the setting.
func (c *Config) Validate() error {
	for _, validate := range []func() error{
		c.validateNames, c.validateLimits, c.validateNATS, c.validateApp, c.validateStateDir,
	} {
		if err := validate(); err != nil {
			return err
		}
	}
	return nil
}

// badConfig is a configuration error: it wraps ErrConfig.
func badConfig(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrConfig, fmt.Sprintf(format, args...))
}

// validateNames checks the names that go into subjects, and names the node
// when no name is given.
func (c *Config) validateNames() error {
	if c.Node == "" {
		c.Node = defaultNodeName()
	}
	for _, t := range []struct{ key, val string }{{"pool", c.Pool}, {"node", c.Node}} {
		if err := protocol.ValidToken(t.val); err != nil {
			return badConfig("--%s: %v", t.key, err)
		}
	}
	if err := protocol.ValidPrefix(c.Prefix); err != nil {
		return badConfig("--prefix: %v", err)
	}
	return nil
}

// validateLimits checks the sizes, counts and durations, and the
// containment mode (defaulting to auto), which the worker limits need.
func (c *Config) validateLimits() error {
	if c.Workers < 1 {
		return badConfig("--workers must be at least 1, not %d", c.Workers)
	}
	if c.Concurrency < 1 {
		return badConfig("--concurrency must be at least 1, not %d", c.Concurrency)
	}
	if c.QueueLimit < 0 {
		return badConfig("--queue-limit must not be negative, not %d", c.QueueLimit)
	}
	if err := c.validateTimeouts(); err != nil {
		return err
	}
	if c.QueueLimitBytes < 1 {
		return badConfig("--queue-limit-bytes must be at least 1, not %d", c.QueueLimitBytes)
	}
	if c.MaxSessions < 1 {
		return badConfig("--max-sessions must be at least 1, not %d", c.MaxSessions)
	}
	if c.MaxResultBytes < 0 {
		return badConfig("--max-result-bytes must not be negative, not %d", c.MaxResultBytes)
	}
	for _, d := range []struct {
		flag string
		val  time.Duration
	}{{"--connect-wait", c.ConnectWait}, {"--shutdown-grace", c.ShutdownGrace}} {
		if d.val < 0 {
			return badConfig("%s must not be negative, not %s", d.flag, d.val)
		}
	}
	for _, n := range []struct {
		flag string
		val  int
	}{{"--max-requests", c.MaxRequests}, {"--max-memory", c.MaxMemoryMB},
		{"--worker-memory-limit", c.WorkerMemoryLimitMB}, {"--worker-pids-limit", c.WorkerPidsLimit}} {
		if n.val < 0 {
			return badConfig("%s must not be negative, not %d", n.flag, n.val)
		}
	}
	if c.MaxAge < 0 {
		return badConfig("--max-age must not be negative, not %s", c.MaxAge)
	}
	if c.StreamReplicas < 1 || c.StreamReplicas > 5 {
		return badConfig("--stream-replicas must be from 1 to 5, not %d", c.StreamReplicas)
	}
	if c.Containment == "" {
		c.Containment = lifecycle.ModeAuto
	}
	if err := lifecycle.ValidMode(c.Containment); err != nil {
		return badConfig("--containment: %v", err)
	}
	if c.MaxDeliver < 1 {
		return badConfig("--max-deliver must be at least 1, not %d", c.MaxDeliver)
	}
	return nil
}

// validateTimeouts checks the default deadlines of a request and of a job
// against the most either may ask for.
func (c *Config) validateTimeouts() error {
	if c.RequestTimeout <= 0 {
		return badConfig("--request-timeout must be positive, not %s", c.RequestTimeout)
	}
	if c.MaxTimeout <= 0 {
		return badConfig("--max-timeout must be positive, not %s", c.MaxTimeout)
	}
	if c.RequestTimeout > c.MaxTimeout {
		return badConfig("--request-timeout %s is over --max-timeout %s", c.RequestTimeout, c.MaxTimeout)
	}
	switch {
	case c.JobTimeout < 0:
		return badConfig("--job-timeout must be positive, not %s", c.JobTimeout)
	case c.JobTimeout == 0:
		// A --max-timeout under the default is no reason to refuse to
		// start: the default gives way, as an explicit value would not.
		c.JobTimeout = min(DefaultJobTimeout, c.MaxTimeout)
	}
	if c.JobTimeout > c.MaxTimeout {
		return badConfig("--job-timeout %s is over --max-timeout %s", c.JobTimeout, c.MaxTimeout)
	}
	return nil
}

// validateNATS checks the servers to join, or the embedded server's
// address, and that the credential files named exist.
func (c *Config) validateNATS() error {
	if c.NATS == "" {
		if err := c.checkListen(); err != nil {
			return badConfig("%v", err)
		}
	} else if err := checkNATSURLs(c.NATS); err != nil {
		return badConfig("--nats: %v", err)
	}
	for _, f := range []struct{ flag, path string }{
		{"--nats-creds", c.NATSCreds}, {"--nats-tls-ca", c.NATSTLSCA},
		{"--nats-tls-cert", c.NATSTLSCert}, {"--nats-tls-key", c.NATSTLSKey},
	} {
		if f.path == "" {
			continue
		}
		if _, err := os.Stat(f.path); err != nil {
			return badConfig("%s: %v", f.flag, err)
		}
	}
	return nil
}

// validateApp resolves the app, its directory and the interpreter that
// runs it, and checks that the interpreter imports pyfleet.
func (c *Config) validateApp() error {
	return c.validateAppIn(processPythonEnv())
}

func (c *Config) validateAppIn(env pythonEnv) error {
	if c.App == "" {
		// The demo app of the checkout this runs from, wherever it is run.
		roots := repoRoots(env)
		if len(roots) == 0 {
			return badConfig("--app is required: there is no pyfleet checkout here or around this binary " +
				"to take the demo app from; name your app's .py file or MODULE[:ATTR]")
		}
		c.App, c.AppDir = "demo", filepath.Join(roots[0], "python", "examples")
	}
	// A path to a .py file is the friendliest way to name an app: its
	// directory goes on sys.path and its base name is the module.
	if module, attr, _ := strings.Cut(c.App, ":"); strings.HasSuffix(module, ".py") {
		if _, err := os.Stat(module); err != nil {
			return badConfig("--app %q: %v", module, err)
		}
		c.AppDir = filepath.Dir(module)
		c.App = strings.TrimSuffix(filepath.Base(module), ".py")
		if attr != "" {
			c.App += ":" + attr
		}
	}
	appDir, err := filepath.Abs(c.AppDir)
	if err != nil {
		return badConfig("--app-dir %q: %v", c.AppDir, err)
	}
	if st, err := os.Stat(appDir); err != nil || !st.IsDir() {
		return badConfig("--app-dir %q is not a directory", c.AppDir)
	}
	c.AppDir = appDir
	return c.validatePython(env)
}

// validatePython chooses the interpreter (python.go) and starts it once to
// check it can run a worker.
func (c *Config) validatePython(env pythonEnv) error {
	chosen, from := choosePython(c.Python, env)
	python, err := findExecutable(chosen, env.lookPath)
	if err != nil {
		return badConfig("--python: %s (%s): %v", chosen, from, err)
	}
	if c.deferImportCheck && !isPyenvShim(python) {
		// A shim is replaced by the interpreter the check names; any
		// other path runs as it is, so the check's verdict can wait.
		c.Python, c.PythonFrom = python, from
		dir := c.AppDir
		c.importCheck = startImportCheck(func(ctx context.Context) error {
			_, err := checkPython(ctx, python, from, dir, env)
			return err
		})
		return nil
	}
	p, err := checkPython(context.Background(), python, from, c.AppDir, env)
	if err != nil {
		return err
	}
	if isPyenvShim(python) {
		python = p.executable
	}
	c.Python, c.PythonFrom = python, from
	return nil
}

// checkPython starts python once (probePython) and turns a failure into
// the configuration error a user reads: which interpreter, why it was
// chosen, and the command that fixes it.
func checkPython(ctx context.Context, python, from, dir string, env pythonEnv) (probe, error) {
	p, err := probePython(ctx, python, dir)
	if err == nil {
		return p, nil
	}
	var imp *importError
	if errors.As(err, &imp) {
		shown := python
		if isPyenvShim(python) && p.executable != "" {
			shown = p.executable
		}
		return p, badConfig("--python: %s (%s) %v\n%s", python, from, err, installHint(shown, p, env))
	}
	return p, badConfig("--python: %s (%s): %v", python, from, err)
}

// validateStateDir makes the state dir absolute, defaulting it; its
// ownership and modes are checked when the node starts (statedir.go).
func (c *Config) validateStateDir() error {
	var err error
	if c.StateDir == "" {
		if c.StateDir, err = defaultStateDir(); err != nil {
			return badConfig("--state-dir: %v", err)
		}
	}
	if c.StateDir, err = filepath.Abs(c.StateDir); err != nil {
		return badConfig("--state-dir: %v", err)
	}
	return nil
}

// authFlags is how an error names the settings that protect the embedded
// server.
const authFlags = "--nats-user and --nats-password, or --nats-token, or --nats-tls-ca with --nats-tls-cert and --nats-tls-key (client certificates)"

// checkListen refuses an embedded server that anyone on the network could
// use: a --listen host other than loopback needs credentials.
func (c *Config) checkListen() error {
	if c.Listen == "" {
		return errors.New("--listen is empty and no --nats server is given")
	}
	host, _, err := net.SplitHostPort(c.Listen)
	if err != nil {
		return fmt.Errorf("--listen %q: %v", c.Listen, err)
	}
	emb := bus.EmbeddedConfig{User: c.NATSUser, Password: c.NATSPassword, Token: c.NATSToken,
		TLSCA: c.NATSTLSCA, TLSCert: c.NATSTLSCert, TLSKey: c.NATSTLSKey}
	authed := emb.Authenticated()
	switch {
	case host == "" && !authed:
		return fmt.Errorf("--listen %q has no host, which would open the embedded NATS server on every interface "+
			"with no credentials: listen on 127.0.0.1, or write 0.0.0.0 and set %s", c.Listen, authFlags)
	case host == "":
		return fmt.Errorf("--listen %q has no host: write 0.0.0.0 to listen on every interface", c.Listen)
	case !bus.LoopbackHost(host) && !authed:
		return fmt.Errorf("--listen %q is not a loopback address, and the embedded NATS server has no credentials: "+
			"anyone who can reach it could call every function; set %s, or listen on 127.0.0.1", c.Listen, authFlags)
	}
	return nil
}

// natsSchemes are the URL schemes nats.go can dial; it would take any other
// (http://…) as plain NATS and fail later with a vaguer error.
var natsSchemes = map[string]bool{"nats": true, "tls": true, "ws": true, "wss": true}

// checkNATSURLs catches a --nats list that no wait would make work.
func checkNATSURLs(list string) error {
	for _, raw := range strings.Split(list, ",") {
		raw = strings.TrimSpace(raw)
		if raw == "" {
			return errors.New("an empty URL in the list")
		}
		full := raw
		if !strings.Contains(raw, "://") {
			full = "nats://" + raw // nats.go's default
		}
		u, err := url.Parse(full)
		if err != nil {
			return fmt.Errorf("%q is not a URL", redactURL(raw))
		}
		if !natsSchemes[u.Scheme] {
			return fmt.Errorf("%q: scheme %q is not one of nats, tls, ws, wss", redactURL(raw), u.Scheme)
		}
		if u.Hostname() == "" {
			return fmt.Errorf("%q has no host", redactURL(raw))
		}
		if p := u.Port(); p != "" {
			if n, err := strconv.Atoi(p); err != nil || n < 1 || n > 65535 {
				return fmt.Errorf("%q: port %q is not a number from 1 to 65535", redactURL(raw), p)
			}
		}
	}
	return nil
}

// redactURL hides what could be a password or token before a URL goes into
// an error: everything before the last '@'.
func redactURL(s string) string {
	if at := strings.LastIndex(s, "@"); at >= 0 {
		scheme := ""
		if k := strings.Index(s, "://"); k >= 0 && k < at {
			scheme = s[:k+3]
		}
		return scheme + "***" + s[at:]
	}
	return s
}

// findExecutable resolves an interpreter to an absolute path without
// following symlinks: a venv's python finds its packages through the
// symlink's own location.
func findExecutable(name string, lookPath func(string) (string, error)) (string, error) {
	path := name
	if !strings.Contains(name, "/") {
		p, err := lookPath(name)
		if err != nil {
			return "", err
		}
		path = p
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return "", err
	}
	st, err := os.Stat(abs)
	if err != nil {
		return "", fmt.Errorf("no interpreter there: %w", err)
	}
	if st.IsDir() || st.Mode()&0o111 == 0 {
		return "", errors.New("not an executable file")
	}
	return abs, nil
}

func defaultStateDir() (string, error) {
	if xdg := os.Getenv("XDG_STATE_HOME"); xdg != "" {
		return filepath.Join(xdg, "pyfleet"), nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", err
	}
	return filepath.Join(home, ".local", "state", "pyfleet"), nil
}

// defaultNodeName is the host name (dots made dashes, as names are subject
// tokens) plus a short random suffix, so two nodes on one host differ.
func defaultNodeName() string {
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "node"
	}
	host = strings.Map(func(r rune) rune {
		if r == '.' || r == '*' || r == '>' || r == ' ' || r == '\t' {
			return '-'
		}
		return r
	}, host)
	return host + "-" + randomHex(3)
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return hex.EncodeToString(b)
}
