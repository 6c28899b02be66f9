package node

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"go.uber.org/zap"

	"github.com/pyfleet/pyfleet/bus"
	"github.com/pyfleet/pyfleet/lifecycle"
	"github.com/pyfleet/pyfleet/pool"
)

// Version is reported by the micro service.
const Version = "0.1.0"

// Run runs a node until ctx ends, then drains it: no new calls, in-flight
// calls get ShutdownGrace to finish, every worker is stopped, node_stopped is
// published. Closing abort (a second signal) cuts the drain short and kills
// the workers at once; they are still reaped before Run returns.
//
// Errors that wrap ErrConfig mean the configuration or the app is wrong.
func Run(ctx context.Context, cfg Config, log *zap.Logger, abort <-chan struct{}) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	run := randomHex(4)
	log = log.With(zap.String("node", cfg.Node), zap.String("pool", cfg.Pool))

	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("%w: --state-dir %s: %v", ErrConfig, cfg.StateDir, err)
	}
	// Sockets live in a directory only this user can enter: the secret
	// guards each call, the directory keeps other users from even trying.
	socketDir := filepath.Join(cfg.StateDir, "run", run)
	if err := os.MkdirAll(socketDir, 0o700); err != nil {
		return fmt.Errorf("%w: --state-dir %s is not writable: %v", ErrConfig, cfg.StateDir, err)
	}
	if err := os.Chmod(socketDir, 0o700); err != nil {
		return fmt.Errorf("socket dir: %w", err)
	}
	defer os.RemoveAll(socketDir)

	nc, ns, err := connect(cfg, log)
	if err != nil {
		return err
	}
	defer func() {
		// Flush so node_stopped and the last replies leave before we go.
		_ = nc.FlushTimeout(2 * time.Second)
		nc.Close()
		if ns != nil {
			ns.Shutdown()
			ns.WaitForShutdown()
		}
	}()

	events := bus.NewEventPublisher(nc, cfg.Prefix, cfg.Pool, cfg.Node, log)
	events.Publish(lifecycle.Event{Kind: lifecycle.KindNodeStarted, Run: run, PID: os.Getpid()})

	spawner := lifecycle.NewSpawner()
	defer spawner.Close()

	p, err := pool.New(pool.Config{
		Python:      cfg.Python,
		App:         cfg.App,
		AppDir:      cfg.AppDir,
		SocketDir:   socketDir,
		Node:        cfg.Node,
		Run:         run,
		Workers:     cfg.Workers,
		Concurrency: cfg.Concurrency,
		QueueLimit:  cfg.QueueLimit,
		MaxRequests: cfg.MaxRequests,
		MaxMemory:   uint64(cfg.MaxMemoryMB) << 20,
		MaxAge:      cfg.MaxAge,
		Spawner:     spawner,
		Events:      events.Publish,
		Logger:      log,
	})
	if err != nil {
		return fmt.Errorf("%w: %v", ErrConfig, err)
	}
	start := time.Now()
	if err := p.Start(ctx); err != nil {
		events.Publish(lifecycle.Event{Kind: lifecycle.KindNodeStopped, Run: run, Detail: err.Error()})
		var appErr *pool.AppError
		if errors.As(err, &appErr) {
			return fmt.Errorf("%w: --app %s: %v", ErrConfig, cfg.App, appErr)
		}
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("%w: no worker could start: %v", ErrConfig, err)
	}
	log.Info("workers ready", zap.Int("workers", p.Stats().Workers), zap.Duration("took", time.Since(start)))

	svc, err := bus.Serve(nc, bus.ServiceConfig{
		Prefix:         cfg.Prefix,
		Pool:           cfg.Pool,
		Node:           cfg.Node,
		Version:        Version,
		DefaultTimeout: cfg.RequestTimeout,
		Stats:          func() any { return p.Stats() },
	}, p, log)
	if err != nil {
		p.Close()
		return fmt.Errorf("serve: %w", err)
	}
	log.Info("serving", zap.String("subject", cfg.Prefix+".req."+cfg.Pool+".*"), zap.Int("functions", len(p.Functions())))

	<-ctx.Done()

	log.Info("draining", zap.Duration("grace", cfg.ShutdownGrace))
	events.Publish(lifecycle.Event{Kind: lifecycle.KindNodeStopping, Run: run})
	svc.Drain()
	drainCtx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownGrace)
	watcherDone := make(chan struct{})
	go func() {
		defer close(watcherDone)
		// A second signal ends the grace at once.
		select {
		case <-abort:
			cancel()
		case <-drainCtx.Done():
		}
	}()
	if err := p.Drain(drainCtx); err != nil {
		log.Warn("in-flight calls did not finish within the grace", zap.Error(err))
	}
	cancel()
	<-watcherDone
	select {
	case <-abort:
		p.Abort()
	default:
	}
	stopDone := make(chan struct{})
	go func() {
		defer close(stopDone)
		p.Close()
	}()
	select {
	case <-stopDone:
	case <-abort:
		p.Abort()
		<-stopDone
	}
	stopCtx, cancelStop := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancelStop()
	if err := svc.Stop(stopCtx); err != nil {
		log.Warn("service stop", zap.Error(err))
	}
	events.Publish(lifecycle.Event{Kind: lifecycle.KindNodeStopped, Run: run})
	log.Info("stopped")
	return nil
}

// connect joins the NATS servers in cfg, or starts an embedded one (loopback
// by default, JetStream stored in the state dir) and connects in-process.
func connect(cfg Config, log *zap.Logger) (*nats.Conn, *server.Server, error) {
	conn := bus.ConnConfig{
		URLs:     cfg.NATS,
		Name:     "poolnode " + cfg.Node,
		Creds:    cfg.NATSCreds,
		User:     cfg.NATSUser,
		Password: cfg.NATSPassword,
		Token:    cfg.NATSToken,
		TLSCA:    cfg.NATSTLSCA,
		TLSCert:  cfg.NATSTLSCert,
		TLSKey:   cfg.NATSTLSKey,
	}
	var ns *server.Server
	if cfg.NATS == "" {
		var err error
		ns, err = bus.StartEmbedded(bus.EmbeddedConfig{
			Listen:   cfg.Listen,
			StoreDir: filepath.Join(cfg.StateDir, "jetstream"),
			User:     cfg.NATSUser,
			Password: cfg.NATSPassword,
			Token:    cfg.NATSToken,
		}, log)
		if err != nil {
			return nil, nil, fmt.Errorf("%w: embedded NATS server: %v", ErrConfig, err)
		}
		log.Info("embedded NATS server listening", zap.String("url", ns.ClientURL()))
		conn.InProcess = ns
	}
	nc, err := bus.Connect(conn, log)
	if err != nil {
		if ns != nil {
			ns.Shutdown()
			ns.WaitForShutdown()
		}
		return nil, nil, fmt.Errorf("%w: connect to NATS: %v", ErrConfig, err)
	}
	return nc, ns, nil
}
