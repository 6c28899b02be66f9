package metrics

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// ShutdownTimeout bounds how long Serve waits, once its ctx has ended, for
// scrapes in flight before it closes their connections. A scrape takes
// milliseconds; the bound is met only by a client that connected and sent
// nothing yet, which http.Server.Shutdown does not count as idle.
const ShutdownTimeout = time.Second

// Listen opens the TCP listener for Serve on addr (HOST:PORT; port 0 picks
// one). It is separate from Serve so that a bad address is reported when
// the node starts, not from a goroutine later.
func Listen(addr string) (net.Listener, error) {
	if addr == "" {
		return nil, errors.New("metrics: empty listen address")
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	return ln, nil
}

// Handler serves GET /metrics (the registry, in the format the scraper
// asks for) and GET /healthz: 200 "ok" while ready reports true, else 503
// with the reason it gives. A nil ready is always ready.
func (m *Metrics) Handler(ready func() (bool, string)) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.InstrumentMetricHandler(m.reg,
		promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{
			// A collector that fails still leaves the others served.
			ErrorHandling:     promhttp.ContinueOnError,
			Registry:          m.reg, // counts promhttp_metric_handler_errors_total
			EnableOpenMetrics: true,
			// Scrapes are cheap but not free: past this many at once
			// the rest get 503 rather than piling up.
			MaxRequestsInFlight: 4,
		})))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		ok, reason := true, ""
		if ready != nil {
			ok, reason = ready()
		}
		if ok {
			_, _ = io.WriteString(w, "ok\n")
			return
		}
		if reason == "" {
			reason = "not ready"
		}
		w.WriteHeader(http.StatusServiceUnavailable)
		_, _ = io.WriteString(w, reason+"\n")
	})
	// Go's profiler, for make bench -profile and for hunting a slow node;
	// only when PYFLEET_PPROF is set, since a profile costs the node CPU.
	if os.Getenv("PYFLEET_PPROF") != "" {
		mux.HandleFunc("GET /debug/pprof/", pprof.Index)
		mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	}
	return mux
}

// Serve serves Handler(ready) on ln until ctx ends, then shuts the server
// down: it stops accepting, lets scrapes in flight finish for up to
// ShutdownTimeout, then closes what is left. It returns once the server
// has stopped and ln is closed (Serve takes ownership of ln): nil after ctx
// ended, else the error that stopped the server.
func (m *Metrics) Serve(ctx context.Context, ln net.Listener, ready func() (bool, string)) error {
	srv := &http.Server{
		Handler:           m.Handler(ready),
		ReadHeaderTimeout: 10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       2 * time.Minute,
	}
	served := make(chan error, 1) // one send; buffered so the goroutine never waits on us
	go func() { served <- srv.Serve(ln) }()

	select {
	case err := <-served:
		// The listener failed on its own; Serve has already closed it.
		_ = srv.Close()
		return fmt.Errorf("metrics: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), ShutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		_ = srv.Close() // the grace is over: cut the slow scrapes off
	}
	if err := <-served; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("metrics: %w", err)
	}
	return nil
}
