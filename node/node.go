package node

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"go.uber.org/zap"

	"github.com/pyfleet/pyfleet/bus"
	"github.com/pyfleet/pyfleet/lifecycle"
	"github.com/pyfleet/pyfleet/metrics"
	"github.com/pyfleet/pyfleet/pool"
)

// Version is reported by the micro service.
const Version = "0.1.0"

// Run runs a node until ctx ends, then drains it: no new calls or jobs,
// in-flight work gets ShutdownGrace to finish, every worker and everything
// it started is stopped, node_stopped is published. Closing abort (a second
// signal) cuts the drain short and kills the workers at once; they are still
// reaped before Run returns.
//
// Errors that wrap ErrConfig mean the configuration or the app is wrong.
func Run(ctx context.Context, cfg Config, log *zap.Logger, abort <-chan struct{}) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	run := randomHex(4)
	log = log.With(zap.String("node", cfg.Node), zap.String("pool", cfg.Pool))

	var m *metrics.Metrics
	var metricsLn net.Listener
	if cfg.Metrics != "" {
		var err error
		if metricsLn, err = metrics.Listen(cfg.Metrics); err != nil {
			return fmt.Errorf("%w: --metrics: %v", ErrConfig, err)
		}
		m = metrics.New(cfg.Pool, cfg.Node)
	}
	var ready atomic.Pointer[string] // why /healthz is not ready; nil when ready
	notReady := func(why string) { ready.Store(&why) }
	notReady("starting")
	var bg sync.WaitGroup // goroutines Run owns; waited for on every return
	defer bg.Wait()
	if metricsLn != nil {
		metricsCtx, stopMetrics := context.WithCancel(context.Background())
		defer stopMetrics() // the last thing: scrapes keep working while draining
		bg.Go(func() {
			err := m.Serve(metricsCtx, metricsLn, func() (bool, string) {
				if why := ready.Load(); why != nil {
					return false, *why
				}
				return true, ""
			})
			if err != nil {
				log.Warn("metrics server", zap.Error(err))
			}
		})
	}

	stateDir, err := prepareStateDir(cfg.StateDir) // see statedir.go: no other user may write to it
	if err != nil {
		return fmt.Errorf("%w: %v", ErrConfig, err)
	}
	cfg.StateDir = stateDir
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

	// The lock says "this run is alive" for as long as this process lives;
	// the kernel drops it however the process dies, which is what lets a
	// later node reap this run's leftovers and never a live run's workers.
	lock, err := lifecycle.AcquireNodeLock(cfg.StateDir, cfg.Node, run)
	if err != nil {
		return fmt.Errorf("%w: --state-dir %s: %v", ErrConfig, cfg.StateDir, err)
	}
	defer func() {
		if err := lock.Release(); err != nil {
			log.Warn("release node lock", zap.Error(err))
		}
	}()
	// The strongest containment the host offers (or the one asked for),
	// and why each stronger one was passed over.
	contain, passedOver, err := lifecycle.NewContainment(cfg.Containment, lifecycle.Marker{Node: cfg.Node, Run: run})
	if err != nil {
		return fmt.Errorf("%w: --containment %s: %v", ErrConfig, cfg.Containment, err)
	}
	if cl, ok := contain.(io.Closer); ok {
		// Runs after the guardian's Stop, which removes the run's
		// cgroup; this covers a return before the guardian started.
		defer func() {
			if err := cl.Close(); err != nil {
				log.Warn("remove the run's containment", zap.Error(err))
			}
		}()
	}
	limits := lifecycle.Limits{Memory: uint64(cfg.WorkerMemoryLimitMB) << 20, Pids: cfg.WorkerPidsLimit}
	if err := checkLimits(contain, limits); err != nil {
		return err
	}
	logContainment(log, cfg.Containment, contain.Mode(), passedOver)
	registry, err := lifecycle.OpenRegistry(filepath.Join(cfg.StateDir, "registry.db"))
	if err != nil {
		return fmt.Errorf("%w: --state-dir %s: %v", ErrConfig, cfg.StateDir, err)
	}
	// Orphans of workers come back to the node instead of init while it
	// lives, so it can find and reap them.
	if err := lifecycle.SetChildSubreaper(); err != nil {
		log.Warn("cannot become a child subreaper; orphans of live workers go to init", zap.Error(err))
	}

	nc, ns, err := connect(ctx, cfg, log)
	if err != nil {
		if ctx.Err() != nil {
			// Stopped while waiting for NATS: nothing has started, so
			// this is a clean stop.
			log.Info("stopped before NATS could be reached", zap.Error(err))
			return nil
		}
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

	publisher := bus.NewEventPublisher(nc, cfg.Prefix, cfg.Pool, cfg.Node, log)
	events := publisher.Publish
	if m != nil {
		events = func(e lifecycle.Event) {
			publisher.Publish(e)
			m.Event(e)
		}
	}
	events(lifecycle.Event{Kind: lifecycle.KindNodeStarted, Run: run, PID: os.Getpid()})

	spawner := lifecycle.NewSpawner()
	defer spawner.Close()
	reaper, err := lifecycle.NewReaper(lifecycle.ReaperConfig{
		StateDir: cfg.StateDir,
		Registry: registry,
		Spawner:  spawner,
		Lock:     lock, // never sweeps this run; puts its lock file back if removed
		Events:   events,
		Logger:   log,
		// In cgroup mode: records this run's cgroup in the state dir and
		// kills the cgroups of dead runs.
		Containment: contain,
	})
	if err != nil {
		return err
	}
	// What dead runs on this state dir left behind goes before any worker
	// of ours starts.
	if err := reaper.Sweep(); err != nil {
		log.Warn("reaper sweep", zap.Error(err))
	}
	// Guardians of dead runs could not publish their kills; we can.
	if _, err := lifecycle.PublishJournals(cfg.StateDir, events); err != nil {
		log.Warn("guardian journals", zap.Error(err))
	}
	reaperCtx, stopReaper := context.WithCancel(context.Background())
	reaperDone := make(chan struct{})
	go func() {
		defer close(reaperDone)
		_ = reaper.Run(reaperCtx)
	}()
	defer func() {
		stopReaper()
		<-reaperDone
	}()

	// If this process dies without stopping its workers, the guardian
	// kills what they started within milliseconds instead of at the next
	// start. Its Stop runs after the pool's close (defers run last first).
	guardian, err := lifecycle.StartGuardian(lifecycle.Marker{Node: cfg.Node, Run: run}, cfg.StateDir, contain)
	if err != nil {
		return err
	}
	defer guardian.Stop()

	if m != nil {
		m.SetContainment(contain.Mode())
		m.SetReaperStats(reaper.Stats)
		m.SetRegistryStats(func() (int, error) {
			recs, err := registry.List()
			return len(recs), err
		})
		m.SetProcessStats(func() (map[string]int, error) { return workerProcesses(cfg.Node, run) })
	}

	p, err := pool.New(pool.Config{
		Python:          cfg.Python,
		App:             cfg.App,
		AppDir:          cfg.AppDir,
		SocketDir:       socketDir,
		Node:            cfg.Node,
		Run:             run,
		Pool:            cfg.Pool,
		Workers:         cfg.Workers,
		Concurrency:     cfg.Concurrency,
		QueueLimit:      cfg.QueueLimit,
		QueueLimitBytes: cfg.QueueLimitBytes,
		MaxSessions:     cfg.MaxSessions,
		MaxRequests:     cfg.MaxRequests,
		MaxMemory:       uint64(cfg.MaxMemoryMB) << 20,
		MaxAge:          cfg.MaxAge,
		Registry:        registry,
		Spawner:         spawner,
		Events:          events,
		Logger:          log,

		Containment:       contain,
		WorkerMemoryLimit: limits.Memory,
		WorkerPidsLimit:   limits.Pids,
		Guardian:          guardian,
	})
	if err != nil {
		return fmt.Errorf("%w: %v", ErrConfig, err)
	}
	// Whatever happens below, nothing this run started outlives Run. The
	// drain at the end does this itself, before node_stopped.
	killLeftovers := func() {
		if _, err := lifecycle.KillMarked(lifecycle.Marker{Node: cfg.Node, Run: run}, events); err != nil {
			log.Warn("kill leftovers of this run", zap.Error(err))
		}
	}
	stopped := false
	defer func() {
		if !stopped {
			p.Close()
			killLeftovers()
		}
	}()

	start := time.Now()
	if err := p.Start(ctx); err != nil {
		events(lifecycle.Event{Kind: lifecycle.KindNodeStopped, Run: run, Detail: err.Error()})
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
	if m != nil {
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

	svcCfg := bus.ServiceConfig{
		Prefix:         cfg.Prefix,
		Pool:           cfg.Pool,
		Node:           cfg.Node,
		Version:        Version,
		Containment:    contain.Mode(),
		DefaultTimeout: cfg.RequestTimeout,
		MaxTimeout:     cfg.MaxTimeout,
		Stats:          func() any { return p.Stats() },
	}
	jobsCfg := bus.JobsConfig{
		Prefix:         cfg.Prefix,
		Pool:           cfg.Pool,
		Node:           cfg.Node,
		MaxDeliver:     cfg.MaxDeliver,
		Replicas:       cfg.StreamReplicas,
		DefaultTimeout: cfg.RequestTimeout,
		MaxTimeout:     cfg.MaxTimeout,
		MaxResultBytes: cfg.MaxResultBytes,
		Capacity:       p.Idle,
	}
	if m != nil {
		svcCfg.Observe = m.ObserveRequest
		jobsCfg.Outcome = m.Job
	}
	svc, err := bus.Serve(nc, svcCfg, p, log)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	jobsCtx, stopJobs := context.WithCancel(context.Background())
	defer stopJobs()
	// Calls need core NATS only; jobs need JetStream. A server without it
	// leaves this node serving calls, with one warning, rather than not
	// serving at all. Anything but a clear "no JetStream" goes on to
	// StartJobs, which names what failed.
	var jobs *bus.Jobs
	if err := bus.CheckJetStream(jobsCtx, nc); errors.Is(err, bus.ErrNoJetStream) {
		log.Warn("jobs are off: the NATS server has no JetStream; calls are served", zap.String("server", nc.ConnectedServerName()),
			zap.String("url", nc.ConnectedUrlRedacted()), zap.Error(err))
	} else {
		jobs, err = bus.StartJobs(jobsCtx, nc, jobsCfg, p, log)
		if err != nil {
			stopCtx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			_ = svc.Stop(stopCtx)
			return fmt.Errorf("jobs: %w", err)
		}
	}
	ready.Store(nil)
	log.Info("serving", zap.String("subject", cfg.Prefix+".req."+cfg.Pool+".*"), zap.Int("functions", len(p.Functions())))

	<-ctx.Done()

	notReady("draining")
	log.Info("draining", zap.Duration("grace", cfg.ShutdownGrace))
	events(lifecycle.Event{Kind: lifecycle.KindNodeStopping, Run: run})
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
	if jobs != nil {
		if err := jobs.Stop(drainCtx); err != nil {
			log.Warn("jobs did not finish within the grace", zap.Error(err))
		}
	}
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
	killLeftovers()
	stopped = true
	events(lifecycle.Event{Kind: lifecycle.KindNodeStopped, Run: run})
	log.Info("stopped")
	return nil
}

// logContainment is the startup line that says how the workers' trees are
// kept: the mode asked for (--containment), the mode in use and, when it is
// not the strongest, why each stronger mode was passed over.
func logContainment(log *zap.Logger, asked, mode string, passedOver []string) {
	fields := []zap.Field{zap.String("mode", mode), zap.String("asked", asked)}
	if len(passedOver) > 0 {
		fields = append(fields, zap.Strings("passed_over", passedOver))
	}
	log.Info("containment", fields...)
}

// workerProcesses counts the live processes of run's workers' trees by
// worker: a worker's starts are named <worker>-<n> (pool/worker.go), and a
// recycled worker briefly has two.
func workerProcesses(node, run string) (map[string]int, error) {
	byStart, err := lifecycle.RunProcesses(lifecycle.Marker{Node: node, Run: run})
	if err != nil {
		return nil, err
	}
	out := make(map[string]int, len(byStart))
	for start, n := range byStart {
		worker := start
		if i := strings.LastIndexByte(start, '-'); i > 0 {
			worker = start[:i]
		}
		out[worker] += n
	}
	return out, nil
}

// checkLimits refuses, naming the flag, a worker limit the containment
// cannot enforce.
func checkLimits(c lifecycle.Containment, lim lifecycle.Limits) error {
	for _, f := range []struct {
		flag string
		lim  lifecycle.Limits
	}{
		{"--worker-memory-limit", lifecycle.Limits{Memory: lim.Memory}},
		{"--worker-pids-limit", lifecycle.Limits{Pids: lim.Pids}},
	} {
		if f.lim.IsZero() {
			continue
		}
		l, ok := c.(lifecycle.Limiter)
		if !ok {
			return fmt.Errorf("%w: %s needs cgroup containment with its controller; the containment is %s", ErrConfig, f.flag, c.Mode())
		}
		if err := l.CheckLimits(f.lim); err != nil {
			return fmt.Errorf("%w: %s: %v", ErrConfig, f.flag, err)
		}
	}
	return nil
}

// connect joins the NATS servers in cfg, retrying for cfg.ConnectWait while
// none can be reached, or starts an embedded one (loopback by default,
// JetStream stored in the state dir) and connects in-process. A server that
// stayed unreachable is a runtime error (exit 1); everything else that
// fails here is configuration (exit 2).
func connect(ctx context.Context, cfg Config, log *zap.Logger) (*nats.Conn, *server.Server, error) {
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
