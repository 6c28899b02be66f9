package bus

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// ConnConfig says how to reach NATS.
type ConnConfig struct {
	// URLs is a comma-separated list of servers; empty means
	// nats.DefaultURL. Ignored when InProcess is set.
	URLs string
	// Name shows in the server's connection list (`nats server report
	// connections`); the node uses "pyfleet <pool>/<node>".
	Name string
	// Creds is a .creds file (JWT and seed).
	Creds string
	// User and Password, or Token.
	User, Password string
	Token          string
	// TLSCA verifies the server; TLSCert and TLSKey authenticate us.
	// Ignored with InProcess: that pipe never leaves the process, and the
	// server lets in-process clients skip TLS even when TCP clients must
	// use it.
	TLSCA, TLSCert, TLSKey string
	// InProcess, when set, connects to that embedded server without TCP,
	// which is both faster and immune to the port being firewalled.
	InProcess *server.Server
	// Wait is how long ConnectContext retries servers that cannot be
	// reached; 0 means one attempt.
	Wait time.Duration
}

// ErrUnreachable marks a connect that failed because no server could be
// reached (refused, unreachable, unresolvable, or silent), as opposed to one
// a server turned away (credentials, TLS) or a bad URL: the first may be a
// server that is not up yet, the others are configuration.
var ErrUnreachable = errors.New("not reachable")

// Connect is ConnectContext without a context.
func Connect(cfg ConnConfig, log *zap.Logger) (*nats.Conn, error) {
	return ConnectContext(context.Background(), cfg, log)
}

// Backoff of ConnectContext's retries: the first wait, and the cap it
// doubles up to. Each wait is jittered down by up to half, so that a fleet
// started together does not knock in step.
const (
	connectBackoffMin = 100 * time.Millisecond
	connectBackoffMax = 2 * time.Second
)

// ConnectContext opens a connection that reconnects forever, with jitter so
// that a fleet does not reconnect in lock step, and logs every disconnect
// and reconnect.
//
// A server that cannot be reached is tried again with backoff for up to
// cfg.Wait, each failed attempt logged as a warning; the error then wraps
// ErrUnreachable and names the URL. A server that answers but turns us away
// ("authorization violation", a TLS error) and a bad URL or creds file fail
// at once: waiting would not fix them. Ending ctx ends the wait, and the
// attempt in progress, at once, with ctx's error.
func ConnectContext(ctx context.Context, cfg ConnConfig, log *zap.Logger) (*nats.Conn, error) {
	if log == nil {
		log = zap.NewNop()
	}
	log = log.Named("nats")
	opts, err := cfg.options(log)
	if err != nil {
		return nil, err
	}
	url := cfg.URLs
	if cfg.InProcess != nil {
		url = "in-process " + cfg.InProcess.ClientURL()
	} else if url == "" {
		url = nats.DefaultURL
	}
	url = redactURLs(url)
	if cfg.InProcess == nil {
		dial := &ctxDialer{d: net.Dialer{Timeout: connectTimeout}, ctx: ctx}
		defer dial.done()
		opts = append(opts, nats.SetCustomDialer(dial))
	}
	start := time.Now()
	backoff := connectBackoffMin
	for attempt := 1; ; attempt++ {
		nc, err := nats.Connect(cfg.URLs, opts...)
		if err == nil {
			log.Info("connected to NATS", zap.String("url", nc.ConnectedUrlRedacted()), zap.String("server", nc.ConnectedServerName()))
			return nc, nil
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("connect to NATS at %s: %w", url, ctx.Err())
		}
		if !unreachable(err) || cfg.InProcess != nil {
			if errors.Is(err, nats.ErrAuthorization) {
				// The server's text is "Authorization Violation"; use the
				// sentinel so the message is the same whatever the server.
				err = fmt.Errorf("%w (check the user, password, token or creds)", nats.ErrAuthorization)
			}
			return nil, fmt.Errorf("connect to NATS at %s: %w", url, err)
		}
		if errors.Is(err, nats.ErrNoServers) {
			// nats.go folds "connection refused" into ErrNoServers;
			// put the likely cause back.
			err = fmt.Errorf("%w (connection refused: is a NATS server running there?)", err)
		}
		left := cfg.Wait - time.Since(start)
		if left <= 0 {
			if cfg.Wait <= 0 {
				return nil, fmt.Errorf("connect to NATS at %s: %w: %w", url, ErrUnreachable, err)
			}
			return nil, fmt.Errorf("connect to NATS at %s: %w after %d attempts in %s: %w",
				url, ErrUnreachable, attempt, time.Since(start).Round(time.Millisecond), err)
		}
		wait := min(backoff/2+rand.N(backoff/2+1), left)
		log.Warn("NATS server not reachable; retrying", zap.String("url", url), zap.Int("attempt", attempt),
			zap.Duration("retry_in", wait), zap.Duration("wait_left", left.Round(time.Millisecond)), zap.Error(err))
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("connect to NATS at %s: %w", url, ctx.Err())
		case <-t.C:
		}
		backoff = min(2*backoff, connectBackoffMax)
	}
}

// connectTimeout bounds one dial and the handshake after it.
const connectTimeout = 5 * time.Second

// unreachable reports whether a connect failed before any server answered:
// refused, no route, a name that does not resolve (yet), or a timeout.
func unreachable(err error) bool {
	if errors.Is(err, nats.ErrNoServers) || errors.Is(err, nats.ErrTimeout) || errors.Is(err, os.ErrDeadlineExceeded) {
		return true
	}
	var dnsErr *net.DNSError
	if errors.As(err, &dnsErr) {
		return true
	}
	var opErr *net.OpError
	return errors.As(err, &opErr) && opErr.Op == "dial"
}

// ctxDialer ties dials to the connect call's context until done is called,
// so that a stop during the connect wait sits out neither a dial to an
// address that never answers nor a peer that accepts and then says nothing
// (ending ctx closes the connection under nats.go's handshake). Later dials,
// the reconnects, are not tied to it.
type ctxDialer struct {
	d net.Dialer

	mu    sync.Mutex
	ctx   context.Context // nil once done
	stops []func() bool   // undo the close-on-cancel of each conn dialled
}

func (d *ctxDialer) Dial(network, address string) (net.Conn, error) {
	d.mu.Lock()
	ctx := d.ctx
	d.mu.Unlock()
	if ctx == nil {
		return d.d.Dial(network, address)
	}
	c, err := d.d.DialContext(ctx, network, address)
	if err != nil {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { c.Close() })
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.ctx == nil { // done came while dialling
		stop()
	} else {
		d.stops = append(d.stops, stop)
	}
	return c, nil
}

// done unties the dialer and its connections from the connect's context.
func (d *ctxDialer) done() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.ctx = nil
	for _, stop := range d.stops {
		stop()
	}
	d.stops = nil
}

func (cfg ConnConfig) options(log *zap.Logger) ([]nats.Option, error) {
	opts := []nats.Option{
		nats.Name(cfg.Name),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(time.Second),
		nats.ReconnectJitter(500*time.Millisecond, 2*time.Second),
		nats.Timeout(connectTimeout),
		nats.DisconnectErrHandler(func(nc *nats.Conn, err error) {
			if err != nil {
				log.Warn("disconnected from NATS", zap.Error(err))
			} else if !nc.IsClosed() {
				log.Warn("disconnected from NATS")
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			log.Info("reconnected to NATS", zap.String("url", nc.ConnectedUrlRedacted()))
		}),
		nats.ClosedHandler(func(nc *nats.Conn) {
			if err := nc.LastError(); err != nil {
				log.Warn("NATS connection closed", zap.Error(err))
			} else {
				log.Debug("NATS connection closed")
			}
		}),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			if sub != nil {
				log.Error("NATS subscription error", zap.String("subject", sub.Subject), zap.Error(err))
			} else {
				log.Error("NATS error", zap.Error(err))
			}
		}),
	}
	if cfg.InProcess != nil {
		opts = append(opts, nats.InProcessServer(cfg.InProcess))
	}
	if cfg.Creds != "" {
		opts = append(opts, nats.UserCredentials(cfg.Creds))
	}
	if cfg.User != "" || cfg.Password != "" {
		opts = append(opts, nats.UserInfo(cfg.User, cfg.Password))
	}
	if cfg.Token != "" {
		opts = append(opts, nats.Token(cfg.Token))
	}
	if cfg.InProcess != nil {
		return opts, nil
	}
	if cfg.TLSCA != "" {
		opts = append(opts, nats.RootCAs(cfg.TLSCA))
	}
	if cfg.TLSCert != "" || cfg.TLSKey != "" {
		if cfg.TLSCert == "" || cfg.TLSKey == "" {
			return nil, errors.New("connect to NATS: a TLS client certificate needs both --nats-tls-cert and --nats-tls-key")
		}
		opts = append(opts, nats.ClientCert(cfg.TLSCert, cfg.TLSKey))
	}
	return opts, nil
}

// redactURLs hides passwords and tokens in URLs before they reach an error
// message or a log.
func redactURLs(urls string) string {
	parts := strings.Split(urls, ",")
	for i, u := range parts {
		u = strings.TrimSpace(u)
		if at := strings.LastIndex(u, "@"); at >= 0 {
			scheme := ""
			if k := strings.Index(u, "://"); k >= 0 && k < at {
				scheme, u, at = u[:k+3], u[k+3:], at-k-3
			}
			u = scheme + "***" + u[at:]
		}
		parts[i] = u
	}
	return strings.Join(parts, ",")
}

// ErrNoJetStream marks a NATS server, or an account on it, without
// JetStream: calls work, jobs cannot.
var ErrNoJetStream = errors.New("no JetStream")

// CheckJetStream asks the connected server whether JetStream is there for
// this connection's account. It returns an error wrapping ErrNoJetStream,
// naming the server, when the server says it is not; another error when the
// question could not be answered (a timeout, a server in a cluster without a
// JetStream leader yet); nil when it is there.
func CheckJetStream(ctx context.Context, nc *nats.Conn) error {
	js, err := jetstream.New(nc)
	if err != nil {
		return fmt.Errorf("JetStream: %w", err)
	}
	if _, err := js.AccountInfo(ctx); err != nil {
		server := fmt.Sprintf("%q at %s", nc.ConnectedServerName(), nc.ConnectedUrlRedacted())
		switch {
		case errors.Is(err, jetstream.ErrJetStreamNotEnabled):
			return fmt.Errorf("%w: NATS server %s runs without it (start it with -js or a jetstream block)", ErrNoJetStream, server)
		case errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount):
			return fmt.Errorf("%w: not enabled for this account on NATS server %s", ErrNoJetStream, server)
		}
		return fmt.Errorf("JetStream account info: %w", err)
	}
	return nil
}
