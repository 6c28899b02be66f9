package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"

	"go.yaml.in/yaml/v3"

	"github.com/pyfleet/pyfleet/node"
)

var errHelp = errors.New("help requested")

// parseConfig reads flags, then PYFLEET_<FLAG> environment variables, then
// the --config file (YAML, keys are flag names), each filling only what the
// one before left unset: flags win over env, env over the file.
func parseConfig(args []string, lookupEnv func(string) (string, bool), stderr io.Writer) (node.Config, logOptions, error) {
	cfg := node.Defaults()
	logOpts := logOptions{level: "info"}
	var configFile string

	fs := flag.NewFlagSet("poolnode", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: poolnode [flags]\n\nEvery flag can also be set as PYFLEET_<FLAG> (upper case, - as _) or in the --config file.\n\n")
		fs.PrintDefaults()
	}
	fs.StringVar(&configFile, "config", "", "YAML `file` of settings, keys are flag names")
	fs.StringVar(&cfg.NATS, "nats", cfg.NATS, "NATS server `URL`s, comma separated; empty runs an embedded server")
	fs.StringVar(&cfg.Listen, "listen", cfg.Listen, "embedded NATS server's client `address` (port 0: a random port)")
	fs.StringVar(&cfg.Prefix, "prefix", cfg.Prefix, "subject `prefix`")
	fs.StringVar(&cfg.Pool, "pool", cfg.Pool, "`pool` this node serves")
	fs.StringVar(&cfg.Node, "node", cfg.Node, "node `name` (default host name + short random)")
	fs.StringVar(&cfg.App, "app", cfg.App, "the Python app, `MODULE[:ATTR]` or a .py file (default the pyfleet checkout's demo app)")
	fs.StringVar(&cfg.AppDir, "app-dir", cfg.AppDir, "`dir`ectory put on the worker's sys.path")
	fs.StringVar(&cfg.Python, "python", cfg.Python, "`interpreter` (default: $VIRTUAL_ENV's, else the pyfleet checkout's python/.venv, else python3; it must import pyfleet)")
	fs.IntVar(&cfg.Workers, "workers", cfg.Workers, "worker processes")
	fs.IntVar(&cfg.Concurrency, "concurrency", cfg.Concurrency, "requests in flight per worker")
	fs.IntVar(&cfg.QueueLimit, "queue-limit", cfg.QueueLimit, "requests waiting on this node before it answers 503")
	fs.Int64Var(&cfg.QueueLimitBytes, "queue-limit-bytes", cfg.QueueLimitBytes, "payload `bytes` of requests waiting on this node before it answers 503")
	fs.IntVar(&cfg.MaxSessions, "max-sessions", cfg.MaxSessions, "sessions this node remembers at once before a new one gets 503")
	fs.DurationVar(&cfg.RequestTimeout, "request-timeout", cfg.RequestTimeout, "deadline of a request that names none")
	fs.DurationVar(&cfg.JobTimeout, "job-timeout", cfg.JobTimeout, "deadline of a job that names none, from the job's start (default 1h, or --max-timeout if less)")
	fs.DurationVar(&cfg.MaxTimeout, "max-timeout", cfg.MaxTimeout, "largest Pyfleet-Timeout a request or job may ask for (400 above it)")
	fs.IntVar(&cfg.MaxResultBytes, "max-result-bytes", 0, "largest result of a job, streamed items included, in `bytes` (0: the NATS max payload)")
	fs.DurationVar(&cfg.ConnectWait, "connect-wait", cfg.ConnectWait, "how long to retry a --nats server that is not up yet")
	fs.DurationVar(&cfg.ShutdownGrace, "shutdown-grace", cfg.ShutdownGrace, "how long in-flight work may finish on stop")
	fs.IntVar(&cfg.MaxRequests, "max-requests", 0, "recycle a worker after about this many requests (0: off)")
	fs.IntVar(&cfg.MaxMemoryMB, "max-memory", 0, "recycle a worker whose process tree's memory passes this many `MB`: its cgroup's memory.current with the memory controller, else RSS (0: off)")
	fs.DurationVar(&cfg.MaxAge, "max-age", 0, "recycle a worker after this long (0: off)")
	fs.IntVar(&cfg.StreamReplicas, "stream-replicas", cfg.StreamReplicas, "replicas of the JetStream streams a node creates when they are missing")
	fs.IntVar(&cfg.MaxDeliver, "max-deliver", cfg.MaxDeliver, "deliveries of a job before it is dead-lettered")
	fs.StringVar(&cfg.StateDir, "state-dir", cfg.StateDir, "`dir`ectory for the registry and sockets (default $XDG_STATE_HOME/pyfleet or ~/.local/state/pyfleet)")
	fs.StringVar(&cfg.Containment, "containment", cfg.Containment, "how each worker's process tree is kept: auto (the strongest the host offers), cgroup, pidns or group")
	fs.IntVar(&cfg.WorkerMemoryLimitMB, "worker-memory-limit", 0, "hard limit on each worker's whole process tree, in `MB`: past it the kernel OOM-kills the tree (cgroup containment with the memory controller; 0: none)")
	fs.BoolVar(&cfg.Preload, "preload", false, "import the app once in a template process and fork workers (and their replacements) from it, in every containment mode; see README")
	fs.IntVar(&cfg.WorkerPidsLimit, "worker-pids-limit", 0, "hard limit on the processes and threads of each worker's tree (cgroup containment with the pids controller; 0: none)")
	fs.StringVar(&cfg.Metrics, "metrics", "", "`address` serving Prometheus /metrics and /healthz (empty: off)")
	fs.StringVar(&logOpts.level, "log-level", logOpts.level, "debug, info, warn or error")
	fs.StringVar(&logOpts.format, "log-format", logOpts.format, "json or console (default console on a terminal)")
	fs.StringVar(&cfg.NATSCreds, "nats-creds", "", "NATS credentials `file`")
	fs.StringVar(&cfg.NATSUser, "nats-user", "", "NATS user")
	fs.StringVar(&cfg.NATSPassword, "nats-password", "", "NATS password")
	fs.StringVar(&cfg.NATSToken, "nats-token", "", "NATS token")
	fs.StringVar(&cfg.NATSTLSCA, "nats-tls-ca", "", "CA `file` to verify the NATS server (with the embedded server: to verify its clients, who must then present a certificate)")
	fs.StringVar(&cfg.NATSTLSCert, "nats-tls-cert", "", "client certificate `file`")
	fs.StringVar(&cfg.NATSTLSKey, "nats-tls-key", "", "client key `file`")

	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return cfg, logOpts, errHelp
		}
		return cfg, logOpts, err
	}
	if fs.NArg() > 0 {
		return cfg, logOpts, fmt.Errorf("unexpected argument %q (poolnode takes flags only)", fs.Arg(0))
	}

	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if !set["config"] {
		if v, ok := lookupEnv(envName("config")); ok {
			configFile = v
		}
	}
	var file map[string]string
	if configFile != "" {
		var err error
		if file, err = readConfigFile(configFile, fs); err != nil {
			return cfg, logOpts, err
		}
	}

	var errs []error
	fs.VisitAll(func(f *flag.Flag) {
		if set[f.Name] || f.Name == "config" {
			return
		}
		if v, ok := lookupEnv(envName(f.Name)); ok {
			if err := fs.Set(f.Name, v); err != nil {
				errs = append(errs, fmt.Errorf("%s=%q: %v", envName(f.Name), v, err))
			}
			return
		}
		if v, ok := file[f.Name]; ok {
			if err := fs.Set(f.Name, v); err != nil {
				errs = append(errs, fmt.Errorf("%s: key %q: %v", configFile, f.Name, err))
			}
		}
	})
	return cfg, logOpts, errors.Join(errs...)
}

func envName(flagName string) string {
	return "PYFLEET_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// readConfigFile reads a flat YAML mapping and rejects keys that are not
// flags, by name, so that a typo does not silently fall back to a default.
// Values are taken as the text written, never as YAML's reading of it: a
// password 0123 must not become the octal number 83. A null value is left
// out, as if the key were absent.
func readConfigFile(path string, fs *flag.FlagSet) (map[string]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--config: %w", err)
	}
	var m map[string]yaml.Node
	if err := yaml.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("--config %s: %w", path, err)
	}
	var unknown []string
	out := make(map[string]string, len(m))
	for k, v := range m {
		if fs.Lookup(k) == nil || k == "config" {
			unknown = append(unknown, fmt.Sprintf("%q", k))
			continue
		}
		if v.Kind != yaml.ScalarNode {
			return nil, fmt.Errorf("--config %s: key %q: want a single value", path, k)
		}
		if v.Tag == "!!null" {
			continue
		}
		out[k] = v.Value
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		return nil, fmt.Errorf("--config %s: unknown key %s", path, strings.Join(unknown, ", "))
	}
	return out, nil
}
