package bus

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"go.uber.org/zap"
)

// DefaultListen is the embedded server's client address when none is given.
const DefaultListen = "127.0.0.1:4222"

// EmbeddedConfig configures the NATS server a node runs when it is given no
// --nats URL.
type EmbeddedConfig struct {
	// Listen is the client address, "host:port"; empty means DefaultListen
	// and port 0 a random free port (see the server's ClientURL). A host
	// other than loopback needs client authentication (see Authenticated).
	Listen string
	// StoreDir holds JetStream's files; it is created if missing. Required:
	// a default under /tmp would lose jobs on reboot without a word.
	StoreDir string
	// ServerName names the server in logs and JetStream; empty lets
	// nats-server pick one.
	ServerName string
	// Client authentication: a user and password, or a token, not both.
	User, Password string
	Token          string
	// TLS for client connections: the server's certificate and key. Once
	// they are set every TCP client must use TLS (in-process ones need
	// not). TLSCA makes client certificates signed by it required.
	TLSCert, TLSKey, TLSCA string
	// ReadyTimeout bounds the wait for the server to accept clients;
	// 0 means 10 s.
	ReadyTimeout time.Duration
}

// StartEmbedded starts an in-process nats-server with JetStream and returns
// it once it accepts connections. The caller shuts it down with Shutdown and
// WaitForShutdown. The server logs through log, named "nats-server".
func StartEmbedded(cfg EmbeddedConfig, log *zap.Logger) (*server.Server, error) {
	if log == nil {
		log = zap.NewNop()
	}
	opts, err := cfg.options()
	if err != nil {
		return nil, fmt.Errorf("embedded NATS server: %w", err)
	}
	srv, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("embedded NATS server: %w", err)
	}
	slog := &serverLogger{log: log.Named("nats-server").WithOptions(zap.AddCallerSkip(1))}
	// Server debug output is per connection and too chatty even for a
	// node's debug log; notices and worse are enough.
	srv.SetLogger(slog, false, false)

	fail := func(err error) (*server.Server, error) {
		srv.Shutdown()
		srv.WaitForShutdown()
		return nil, fmt.Errorf("embedded NATS server on %s: %w", cfg.listen(), err)
	}
	// Start returns once the listener is up or has failed; a failure is
	// reported only through Fatalf, which the default logger turns into
	// os.Exit and ours records.
	srv.Start()
	timeout := cfg.ReadyTimeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	for end := time.Now().Add(timeout); ; {
		if err := slog.fatal(); err != nil {
			return fail(err)
		}
		// Short polls, so that a fatal error ends the wait at once
		// instead of after the whole timeout.
		if srv.ReadyForConnections(50 * time.Millisecond) {
			break
		}
		if time.Now().After(end) {
			return fail(fmt.Errorf("not ready for connections after %s", timeout))
		}
	}
	if !srv.JetStreamEnabled() {
		return fail(errors.New("JetStream did not start"))
	}
	log.Info("embedded NATS server ready", zap.String("url", srv.ClientURL()), zap.String("store_dir", cfg.StoreDir))
	return srv, nil
}

// Authenticated reports whether cfg makes clients prove who they are: a user
// and password, a token, or a client certificate signed by TLSCA.
func (cfg EmbeddedConfig) Authenticated() bool {
	return cfg.User != "" && cfg.Password != "" || cfg.Token != "" || cfg.TLSCA != "" && cfg.TLSCert != "" && cfg.TLSKey != ""
}

// LoopbackHost reports whether a listen host can only be reached from this
// machine: "localhost" or a loopback IP (127.0.0.0/8, ::1). Any other name
// counts as reachable from outside, whatever it resolves to today.
func LoopbackHost(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(strings.TrimSuffix(strings.TrimPrefix(host, "["), "]"))
	return ip != nil && ip.IsLoopback()
}

func (cfg EmbeddedConfig) listen() string {
	if cfg.Listen == "" {
		return DefaultListen
	}
	return cfg.Listen
}

// options validates cfg in one place and turns it into server options.
func (cfg EmbeddedConfig) options() (*server.Options, error) {
	host, portStr, err := net.SplitHostPort(cfg.listen())
	if err != nil {
		return nil, fmt.Errorf("listen address %q: %w", cfg.listen(), err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < 0 || port > 65535 {
		return nil, fmt.Errorf("listen address %q: port %q is not a number from 0 to 65535", cfg.listen(), portStr)
	}
	if port == 0 {
		port = server.RANDOM_PORT
	}
	if host == "" {
		// An empty host would mean every interface; say so explicitly
		// rather than open a node to the network by accident.
		return nil, fmt.Errorf("listen address %q: host is empty (use 0.0.0.0 to listen on every interface)", cfg.listen())
	}
	if !LoopbackHost(host) && !cfg.Authenticated() {
		// Anyone who can reach the port could call every function and
		// publish jobs, events and results as the pool.
		return nil, fmt.Errorf("listen address %q is not loopback and clients need no credentials: "+
			"set a user and password, a token, or a TLS CA for client certificates", cfg.listen())
	}
	if err := checkStoreDir(cfg.StoreDir); err != nil {
		return nil, err
	}
	if cfg.Token != "" && cfg.User != "" {
		return nil, errors.New("both a token and a user are set; use one")
	}
	if cfg.Password != "" && cfg.User == "" {
		return nil, errors.New("a password is set without a user")
	}
	opts := &server.Options{
		ServerName:    cfg.ServerName,
		Host:          host,
		Port:          port,
		NoSigs:        true, // the node owns signals
		JetStream:     true,
		StoreDir:      cfg.StoreDir,
		Username:      cfg.User,
		Password:      cfg.Password,
		Authorization: cfg.Token,
	}
	if cfg.TLSCert != "" || cfg.TLSKey != "" || cfg.TLSCA != "" {
		if cfg.TLSCert == "" || cfg.TLSKey == "" {
			return nil, errors.New("TLS needs both a certificate and a key")
		}
		tc, err := server.GenTLSConfig(&server.TLSConfigOpts{
			CertFile: cfg.TLSCert,
			KeyFile:  cfg.TLSKey,
			CaFile:   cfg.TLSCA,
			Verify:   cfg.TLSCA != "",
		})
		if err != nil {
			return nil, fmt.Errorf("TLS: %w", err)
		}
		opts.TLSConfig = tc
		opts.TLSVerify = cfg.TLSCA != ""
		opts.TLSTimeout = 2
	}
	return opts, nil
}

// checkStoreDir creates dir and proves it writable, so that a bad --state-dir
// is reported by name instead of as a JetStream start-up failure.
func checkStoreDir(dir string) error {
	if dir == "" {
		return errors.New("JetStream store dir is not set")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("JetStream store dir %q: %w", dir, err)
	}
	f, err := os.CreateTemp(dir, ".write-test-*")
	if err != nil {
		return fmt.Errorf("JetStream store dir %q is not writable: %w", dir, err)
	}
	name := f.Name()
	f.Close()
	os.Remove(name)
	return nil
}

// serverLogger sends nats-server's log to zap and keeps the first fatal
// error, which is how the server reports a port in use or a JetStream that
// cannot start.
type serverLogger struct {
	log *zap.Logger

	mu       sync.Mutex
	fatalErr error
}

func (l *serverLogger) fatal() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.fatalErr
}

// Noticef logs at debug level: the server's notices are a banner of some
// twenty lines at every start, and StartEmbedded logs the one that matters.
func (l *serverLogger) Noticef(format string, v ...any) { l.log.Debug(fmt.Sprintf(format, v...)) }
func (l *serverLogger) Warnf(format string, v ...any)   { l.log.Warn(fmt.Sprintf(format, v...)) }
func (l *serverLogger) Errorf(format string, v ...any)  { l.log.Error(fmt.Sprintf(format, v...)) }
func (l *serverLogger) Debugf(format string, v ...any)  { l.log.Debug(fmt.Sprintf(format, v...)) }
func (l *serverLogger) Tracef(format string, v ...any)  { l.log.Debug(fmt.Sprintf(format, v...)) }

func (l *serverLogger) Fatalf(format string, v ...any) {
	msg := fmt.Sprintf(format, v...)
	l.log.Error(msg)
	l.mu.Lock()
	if l.fatalErr == nil {
		l.fatalErr = errors.New(msg)
	}
	l.mu.Unlock()
}
