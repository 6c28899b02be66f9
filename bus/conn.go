package bus

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
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
	TLSCA, TLSCert, TLSKey string
	// InProcess, when set, connects to that embedded server without TCP,
	// which is both faster and immune to the port being firewalled.
	InProcess *server.Server
}

// Connect opens a connection that reconnects forever, with jitter so that a
// fleet does not reconnect in lock step, and logs every disconnect and
// reconnect. The first attempt fails at once with the cause named
// ("authorization violation", "connection refused", a TLS error): a node
// that cannot reach NATS at start is misconfigured far more often than
// unlucky.
func Connect(cfg ConnConfig, log *zap.Logger) (*nats.Conn, error) {
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
	nc, err := nats.Connect(cfg.URLs, opts...)
	if err != nil {
		switch {
		case errors.Is(err, nats.ErrNoServers):
			// nats.go folds "connection refused" into ErrNoServers;
			// put the likely cause back.
			err = fmt.Errorf("%w (connection refused: is a NATS server running there?)", err)
		case errors.Is(err, nats.ErrAuthorization):
			// The server's text is "Authorization Violation"; use the
			// sentinel so the message is the same whatever the server.
			err = fmt.Errorf("%w (check the user, password, token or creds)", nats.ErrAuthorization)
		}
		return nil, fmt.Errorf("connect to NATS at %s: %w", redactURLs(url), err)
	}
	log.Info("connected to NATS", zap.String("url", nc.ConnectedUrlRedacted()), zap.String("server", nc.ConnectedServerName()))
	return nc, nil
}

func (cfg ConnConfig) options(log *zap.Logger) ([]nats.Option, error) {
	opts := []nats.Option{
		nats.Name(cfg.Name),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(time.Second),
		nats.ReconnectJitter(500*time.Millisecond, 2*time.Second),
		nats.Timeout(5 * time.Second),
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
