package node

// The phases of Run, in the order it runs them. Each pushes a closer
// (node.go) for everything it opens, right after opening it, so that the
// closers undo a run in reverse: the control and status subscriptions,
// the service, the jobs' ctx, the reload loop, the workers, the leftovers
// of this run, the guardian, the reaper, the spawner, NATS, the
// containment, the lock, the socket dir, and last the metrics server.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"go.uber.org/zap"

	"github.com/pyfleet/pyfleet/bus"
	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/lifecycle"
	"github.com/pyfleet/pyfleet/metrics"
	"github.com/pyfleet/pyfleet/pool"
	"github.com/pyfleet/pyfleet/ratelimit"
)

// serveMetrics serves /metrics and /healthz with --metrics. It is the first
// phase so that its closer is the last: scrapes keep working while the node
// drains.
func (n *node) serveMetrics(context.Context) error {
	n.notReady("starting")
	if n.cfg.Metrics == "" {
		return nil
	}
	ln, err := metrics.Listen(n.cfg.Metrics)
	if err != nil {
		return fmt.Errorf("%w: --metrics: %v", ErrConfig, err)
	}
	n.metrics = metrics.New(n.cfg.Pool, n.cfg.Node)
	n.goUntilClose(func(ctx context.Context) {
		if err := n.metrics.Serve(ctx, ln, n.readiness); err != nil {
			n.log.Warn("metrics server", zap.Error(err))
		}
	})
	return nil
}

// openState claims this run's place on the host: the state dir, a private
// socket dir, the node lock, the containment and the registry; and makes
// the node the subreaper of its workers' orphans.
func (n *node) openState(context.Context) error {
	cfg := &n.cfg
	stateDir, err := prepareStateDir(cfg.StateDir) // see statedir.go: no other user may write to it
	if err != nil {
		return fmt.Errorf("%w: %v", ErrConfig, err)
	}
	cfg.StateDir = stateDir
	// Sockets live in a directory only this user can enter: the secret
	// guards each call, the directory keeps other users from even trying.
	n.socketDir = filepath.Join(cfg.StateDir, "run", n.run)
	if err := os.MkdirAll(n.socketDir, 0o700); err != nil {
		return fmt.Errorf("%w: --state-dir %s is not writable: %v", ErrConfig, cfg.StateDir, err)
	}
	if err := os.Chmod(n.socketDir, 0o700); err != nil {
		return fmt.Errorf("socket dir: %w", err)
	}
	n.onClose(func() { os.RemoveAll(n.socketDir) })

	// The lock says "this run is alive" for as long as this process lives;
	// the kernel drops it however the process dies, which is what lets a
	// later node reap this run's leftovers and never a live run's workers.
	if n.lock, err = lifecycle.AcquireNodeLock(cfg.StateDir, cfg.Node, n.run); err != nil {
		return fmt.Errorf("%w: --state-dir %s: %v", ErrConfig, cfg.StateDir, err)
	}
	n.onClose(func() {
		if err := n.lock.Release(); err != nil {
			n.log.Warn("release node lock", zap.Error(err))
		}
	})
	if err := n.openContainment(); err != nil {
		return err
	}
	if n.registry, err = lifecycle.OpenRegistry(filepath.Join(cfg.StateDir, "registry.db")); err != nil {
		return fmt.Errorf("%w: --state-dir %s: %v", ErrConfig, cfg.StateDir, err)
	}
	// Orphans of workers come back to the node instead of init while it
	// lives, so it can find and reap them.
	if err := lifecycle.SetChildSubreaper(); err != nil {
		n.log.Warn("cannot become a child subreaper; orphans of live workers go to init", zap.Error(err))
	}
	return nil
}

// openContainment takes the strongest containment the host offers (or the
// one asked for), logging why each stronger one was passed over, and
// checks it can enforce the worker limits.
func (n *node) openContainment() error {
	contain, passedOver, err := lifecycle.NewContainment(n.cfg.Containment, n.marker())
	if err != nil {
		return fmt.Errorf("%w: --containment %s: %v", ErrConfig, n.cfg.Containment, err)
	}
	n.contain = contain
	if cl, ok := contain.(io.Closer); ok {
		// Runs after the guardian's Stop, which removes the run's
		// cgroup; this covers a return before the guardian started.
		n.onClose(func() {
			if err := cl.Close(); err != nil {
				n.log.Warn("remove the run's containment", zap.Error(err))
			}
		})
	}
	n.limits = lifecycle.Limits{Memory: uint64(n.cfg.WorkerMemoryLimitMB) << 20, Pids: n.cfg.WorkerPidsLimit}
	if err := checkLimits(contain, n.limits); err != nil {
		return err
	}
	logContainment(n.log, n.cfg.Containment, contain, passedOver)
	return nil
}

// marker is what every process of this run carries.
func (n *node) marker() lifecycle.Marker {
	return lifecycle.Marker{Node: n.cfg.Node, Run: n.run}
}

// connect joins NATS (or starts the embedded server), sets up the events
// and publishes node_started. A stop while it waits for a server is a
// clean stop: nothing has started.
func (n *node) connect(ctx context.Context) error {
	nc, ns, err := joinNATS(ctx, n.cfg, n.log)
	if err != nil {
		if ctx.Err() != nil {
			n.log.Info("stopped before NATS could be reached", zap.Error(err))
			return errStopped
		}
		return err
	}
	n.nc = nc
	n.onClose(func() {
		// Flush so node_stopped and the last replies leave before we go.
		_ = nc.FlushTimeout(2 * time.Second)
		nc.Close()
		if ns != nil {
			ns.Shutdown()
			ns.WaitForShutdown()
		}
	})
	publisher := bus.NewEventPublisher(nc, n.cfg.Prefix, n.cfg.Pool, n.cfg.Node, n.log)
	n.events = publisher.Publish
	if m := n.metrics; m != nil {
		n.events = func(e lifecycle.Event) {
			publisher.Publish(e)
			m.Event(e)
		}
	}
	n.events = n.status.track(n.events)
	n.events(lifecycle.Event{Kind: lifecycle.KindNodeStarted, Run: n.run, PID: os.Getpid()})
	return nil
}

// startReaping clears what dead runs on the state dir left, before any
// worker of ours starts, and starts what keeps this run's own leftovers
// from outliving it: the reaper's loop and the guardian.
func (n *node) startReaping(context.Context) error {
	n.spawner = lifecycle.NewSpawner()
	n.onClose(n.spawner.Close)
	reaper, err := lifecycle.NewReaper(lifecycle.ReaperConfig{
		StateDir: n.cfg.StateDir,
		Registry: n.registry,
		Spawner:  n.spawner,
		Lock:     n.lock, // never sweeps this run; puts its lock file back if removed
		Events:   n.events,
		Logger:   n.log,
		// In cgroup mode: records this run's cgroup in the state dir and
		// kills the cgroups of dead runs.
		Containment: n.contain,
	})
	if err != nil {
		return err
	}
	n.reaper = reaper
	if err := reaper.Sweep(); err != nil {
		n.log.Warn("reaper sweep", zap.Error(err))
	}
	// Guardians of dead runs could not publish their kills; we can.
	if _, err := lifecycle.PublishJournals(n.cfg.StateDir, n.events); err != nil {
		n.log.Warn("guardian journals", zap.Error(err))
	}
	n.goUntilClose(func(ctx context.Context) { _ = reaper.Run(ctx) })

	// If this process dies without stopping its workers, the guardian
	// kills what they started within milliseconds instead of at the next
	// start. Its closer runs after the pool's.
	if n.guardian, err = lifecycle.StartGuardian(n.marker(), n.cfg.StateDir, n.contain); err != nil {
		return err
	}
	n.onClose(n.guardian.Stop)

	if m := n.metrics; m != nil {
		m.SetContainment(n.contain.Mode())
		m.SetReaperStats(reaper.Stats)
		m.SetRegistryStats(func() (int, error) {
			recs, err := n.registry.List()
			return len(recs), err
		})
		m.SetProcessStats(func() (map[string]int, error) { return workerProcesses(n.cfg.Node, n.run) })
	}
	return nil
}

// startPool starts the workers and waits until they are ready. A stop
// while they start is a clean stop; an app that cannot load, or no worker
// that can start, is a configuration error.
func (n *node) startPool(ctx context.Context) error {
	p, err := pool.New(n.poolConfig())
	if err != nil {
		return fmt.Errorf("%w: %v", ErrConfig, err)
	}
	n.pool = p
	// Whatever happens from here, nothing this run started outlives Run:
	// the workers are stopped, then whatever still carries the run's
	// marker is killed.
	n.killLeftovers = n.onCloseOnce(func() {
		if _, err := lifecycle.KillMarked(n.marker(), n.events); err != nil {
			n.log.Warn("kill leftovers of this run", zap.Error(err))
		}
	})
	n.stopWorkers = n.onCloseOnce(n.closePool)

	start := time.Now()
	if err := p.Start(ctx); err != nil {
		n.events(lifecycle.Event{Kind: lifecycle.KindNodeStopped, Run: n.run, Detail: err.Error()})
		if errors.Is(err, ErrConfig) {
			return err // the interpreter's import check
		}
		var appErr *pool.AppError
		if errors.As(err, &appErr) {
			return fmt.Errorf("%w: --app %s: %v", ErrConfig, n.cfg.App, appErr)
		}
		var rtErr *pool.RuntimeError
		if errors.As(err, &rtErr) {
			return fmt.Errorf("%w: --python %s: %v", ErrConfig, n.cfg.Python, rtErr)
		}
		if ctx.Err() != nil {
			return errStopped
		}
		return fmt.Errorf("%w: no worker could start: %v", ErrConfig, err)
	}
	n.log.Info("workers ready", zap.Int("workers", p.Stats().Workers), zap.Duration("took", time.Since(start)))
	n.goUntilClose(n.reloadOnHangup)
	if m := n.metrics; m != nil {
		names := make([]string, 0, len(p.Functions()))
		for _, f := range p.Functions() {
			names = append(names, f.Name)
		}
		m.SetFunctions(names)
		m.SetPoolStats(func() (int, int, int) {
			st := p.Stats()
			return st.Workers, st.Busy, st.Queued
		})
	}
	return nil
}

// poolConfig is the pool's settings.
func (n *node) poolConfig() pool.Config {
	cfg := n.cfg
	return pool.Config{
		Python:          cfg.Python,
		App:             cfg.App,
		AppDir:          cfg.AppDir,
		SocketDir:       n.socketDir,
		Node:            cfg.Node,
		Run:             n.run,
		Pool:            cfg.Pool,
		Workers:         cfg.Workers,
		Concurrency:     cfg.Concurrency,
		QueueLimit:      cfg.QueueLimit,
		QueueLimitBytes: cfg.QueueLimitBytes,
		MaxSessions:     cfg.MaxSessions,
		MaxRequests:     cfg.MaxRequests,
		MaxMemory:       uint64(cfg.MaxMemoryMB) << 20,
		MaxAge:          cfg.MaxAge,
		Registry:        n.registry,
		Spawner:         n.spawner,
		Events:          n.events,
		Logger:          n.log,

		Containment:       n.contain,
		WorkerMemoryLimit: n.limits.Memory,
		WorkerPidsLimit:   n.limits.Pids,
		Guardian:          n.guardian,
		Preload:           n.cfg.Preload,
		BeforeWorkers:     n.cfg.importCheck.wait,
	}
}

// serve serves the pool's functions over NATS (the micro service) and,
// when the server has JetStream, runs its jobs; then the node is ready.
func (n *node) serve(context.Context) error {
	// Cancelled after the service's stop, whichever way Run ends.
	jobsCtx, stopJobs := context.WithCancel(context.Background())
	n.onClose(stopJobs)
	svcCfg, jobsCfg := n.busConfigs()
	h, err := n.rateLimited(&jobsCfg)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	svc, err := bus.Serve(n.nc, svcCfg, h, n.log)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	n.svc = svc
	n.stopService = n.onCloseOnce(func() {
		// Bounded: calls still running after 2 s are cancelled.
		stopCtx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if err := svc.Stop(stopCtx); err != nil {
			n.log.Warn("service stop", zap.Error(err))
		}
	})
	// Calls need core NATS only; jobs need JetStream. A server without it
	// leaves this node serving calls, with one warning, rather than not
	// serving at all. Anything but a clear "no JetStream" goes on to
	// StartJobs, which names what failed.
	if err := bus.CheckJetStream(jobsCtx, n.nc); errors.Is(err, bus.ErrNoJetStream) {
		n.log.Warn("jobs are off: the NATS server has no JetStream; calls are served", zap.String("server", n.nc.ConnectedServerName()),
			zap.String("url", n.nc.ConnectedUrlRedacted()), zap.Error(err))
	} else if n.jobs, err = bus.StartJobs(jobsCtx, n.nc, jobsCfg, h, n.log); err != nil {
		return fmt.Errorf("jobs: %w", err)
	}
	if err := n.serveStatus(); err != nil {
		return fmt.Errorf("status endpoint: %w", err)
	}
	n.ready.Store(nil)
	n.log.Info("serving", zap.String("subject", n.cfg.Prefix+".req."+n.cfg.Pool+".*"), zap.Int("functions", len(n.pool.Functions())))
	return nil
}

// rateLimited is the pool with the app's rate limits applied to calls and
// jobs alike (package ratelimit). A job waiting for its slot holds no
// worker, so the node may fetch more jobs than it has idle workers, but
// no more than rateAhead per worker slot may wait at once: enough that
// the next slots are always taken while earlier jobs settle, and not so
// many that one node takes a whole backlog from the others.
func (n *node) rateLimited(jobs *bus.JobsConfig) (call.Handler, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	lim, err := ratelimit.New(ctx, n.nc, ratelimit.Config{Prefix: n.cfg.Prefix, Pool: n.cfg.Pool, Replicas: n.cfg.StreamReplicas},
		n.pool.Functions(), n.log)
	if err != nil {
		return nil, err
	}
	if lim.Limited() {
		idle, ahead := jobs.Capacity, rateAhead*n.cfg.Workers*n.cfg.Concurrency
		jobs.Capacity = func() int { return min(idle(), ahead-lim.Waiting()) }
	}
	return lim.Wrap(n.pool), nil
}

// rateAhead is how many jobs per worker slot may wait for their rate
// limit's slot on a node.
const rateAhead = 4

// busConfigs are the micro service's and the jobs consumer's settings.
func (n *node) busConfigs() (bus.ServiceConfig, bus.JobsConfig) {
	cfg, p := n.cfg, n.pool
	svc := bus.ServiceConfig{
		Prefix:         cfg.Prefix,
		Pool:           cfg.Pool,
		Node:           cfg.Node,
		Version:        Version,
		Containment:    n.contain.Mode(),
		DefaultTimeout: cfg.RequestTimeout,
		MaxTimeout:     cfg.MaxTimeout,
		Stats:          func() any { return p.Stats() },
	}
	jobs := bus.JobsConfig{
		Prefix:         cfg.Prefix,
		Pool:           cfg.Pool,
		Node:           cfg.Node,
		MaxDeliver:     cfg.MaxDeliver,
		Replicas:       cfg.StreamReplicas,
		DefaultTimeout: cfg.JobTimeout,
		MaxTimeout:     cfg.MaxTimeout,
		MaxResultBytes: cfg.MaxResultBytes,
		Capacity:       p.Idle,
	}
	svc.Observe = n.status.window.Observe
	if m := n.metrics; m != nil {
		svc.Observe = func(function string, code int, d time.Duration) {
			m.ObserveRequest(function, code, d)
			n.status.window.Observe(function, code, d)
		}
		jobs.Outcome = m.Job
	}
	return svc, jobs
}

// joinNATS joins the NATS servers in cfg, retrying for cfg.ConnectWait while
// none can be reached, or starts an embedded one (loopback by default,
// JetStream stored in the state dir) and connects in-process. A server that
// stayed unreachable is a runtime error (exit 1); everything else that
// fails here is configuration (exit 2).
func joinNATS(ctx context.Context, cfg Config, log *zap.Logger) (*nats.Conn, *server.Server, error) {
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
		Wait:     cfg.ConnectWait,
	}
	var ns *server.Server
	if cfg.NATS == "" {
		var err error
		// With an embedded server the TLS flags are the server's side:
		// its certificate, and the CA its clients' certificates must be
		// signed by.
		ns, err = bus.StartEmbedded(bus.EmbeddedConfig{
			Listen:   cfg.Listen,
			StoreDir: filepath.Join(cfg.StateDir, "jetstream"),
			User:     cfg.NATSUser,
			Password: cfg.NATSPassword,
			Token:    cfg.NATSToken,
			TLSCert:  cfg.NATSTLSCert,
			TLSKey:   cfg.NATSTLSKey,
			TLSCA:    cfg.NATSTLSCA,
		}, log)
		if err != nil {
			return nil, nil, fmt.Errorf("%w: embedded NATS server: %v", ErrConfig, err)
		}
		log.Info("embedded NATS server listening", zap.String("url", ns.ClientURL()))
		conn.InProcess = ns
	}
	nc, err := bus.ConnectContext(ctx, conn, log)
	if err != nil {
		if ns != nil {
			ns.Shutdown()
			ns.WaitForShutdown()
		}
		if errors.Is(err, bus.ErrUnreachable) || ctx.Err() != nil {
			return nil, nil, err
		}
		return nil, nil, fmt.Errorf("%w: %v", ErrConfig, err)
	}
	return nc, ns, nil
}
