package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/pyfleet/pyfleet/client"
	"github.com/pyfleet/pyfleet/ui"
)

type uiCmd struct {
	listen  string
	actions bool
	poll    time.Duration
}

func (c *uiCmd) flags(fs *flag.FlagSet) {
	fs.StringVar(&c.listen, "listen", "127.0.0.1:7070", "serve the page on `ADDR` (host:port; loopback by default, the page has no login)")
	fs.BoolVar(&c.actions, "actions", false, "let the page requeue/discard dead letters, cancel jobs, recycle workers, drain nodes")
	fs.DurationVar(&c.poll, "poll", ui.DefaultPoll, "how often to ask the nodes for their status")
}

func (c *uiCmd) run(ctx context.Context, a *app, args []string) error {
	if err := noArgs(args); err != nil {
		return err
	}
	if c.poll <= 0 {
		return usagef("--poll must be positive")
	}
	if _, _, err := net.SplitHostPort(c.listen); err != nil {
		return usagef("--listen %q: want host:port: %v", c.listen, err)
	}
	cl, err := a.connect(client.Options{})
	if err != nil {
		return err
	}
	defer cl.Close()
	logger := log.New(a.stderr, "", log.LstdFlags)
	srv, err := ui.New(ui.Config{Client: cl, Actions: c.actions, Poll: c.poll, Log: logger})
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", c.listen)
	if err != nil {
		return fmt.Errorf("--listen %s: %w", c.listen, err)
	}
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	// Requests' contexts end with ctx, so the pages' streams, which never
	// end by themselves, end at the stop.
	hs := &http.Server{Handler: srv.Handler(), ReadHeaderTimeout: 10 * time.Second, ErrorLog: logger,
		BaseContext: func(net.Listener) context.Context { return ctx }}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		srv.Run(ctx)
	}()
	mode := "read-only"
	if c.actions {
		mode = "actions on"
	}
	// The port may have been 0: print where the page really is.
	fmt.Fprintf(a.stdout, "submit ui: http://%s/ (%s)\n", ln.Addr(), mode)
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	served := false
	select {
	case <-ctx.Done():
	case err = <-errc:
		served = true
	}
	stop()
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = hs.Shutdown(sctx)
	_ = hs.Close()
	if !served {
		<-errc
	}
	wg.Wait()
	if err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
