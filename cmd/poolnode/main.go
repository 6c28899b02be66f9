package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/term"

	"github.com/pyfleet/pyfleet/lifecycle"
	"github.com/pyfleet/pyfleet/node"
)

// Exit statuses (README.md, "poolnode").
const (
	exitOK      = 0
	exitRuntime = 1
	exitConfig  = 2
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == lifecycle.GuardianArg {
		os.Exit(lifecycle.GuardianMain(os.Args[2:], os.Stdin, os.Stderr))
	}
	if len(os.Args) > 1 && os.Args[1] == lifecycle.InitArg {
		os.Exit(lifecycle.InitMain(os.Args[2:]))
	}
	os.Exit(run(os.Args[1:], os.Stderr))
}

func run(args []string, stderr io.Writer) int {
	cfg, logOpts, err := parseConfig(args, os.LookupEnv, stderr)
	if errors.Is(err, errHelp) {
		return exitOK
	}
	if err != nil {
		fmt.Fprintf(stderr, "poolnode: %v\n", err)
		return exitConfig
	}
	log, err := newLogger(logOpts)
	if err != nil {
		fmt.Fprintf(stderr, "poolnode: %v\n", err)
		return exitConfig
	}
	defer func() { _ = log.Sync() }()

	// The first SIGINT or SIGTERM drains; a second one aborts the drain.
	// Without this handler the runtime would exit on the signal and skip
	// every cleanup (the first of Snakepit's orphan bugs).
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	abort := make(chan struct{})
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)
	sigDone := make(chan struct{})
	stopSignals := make(chan struct{})
	go func() {
		defer close(sigDone)
		for n := 0; ; n++ {
			select {
			case s := <-sigs:
				if n == 0 {
					log.Info("signal: draining; send it again to stop at once", zap.String("signal", s.String()))
					cancel()
				} else {
					log.Warn("second signal: stopping at once", zap.String("signal", s.String()))
					close(abort)
					return
				}
			case <-stopSignals:
				return
			}
		}
	}()
	defer func() {
		close(stopSignals)
		<-sigDone
	}()

	err = node.Run(ctx, cfg, log, abort)
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, node.ErrConfig):
		log.Error("cannot start", zap.Error(err))
		fmt.Fprintf(stderr, "poolnode: %v\n", err)
		return exitConfig
	default:
		log.Error("failed", zap.Error(err))
		return exitRuntime
	}
}

type logOptions struct {
	level  string
	format string // json or console; empty: console on a terminal
}

func newLogger(o logOptions) (*zap.Logger, error) {
	level, err := zapcore.ParseLevel(o.level)
	if err != nil {
		return nil, fmt.Errorf("--log-level %q: %w", o.level, err)
	}
	format := o.format
	if format == "" {
		format = "json"
		if term.IsTerminal(int(os.Stderr.Fd())) {
			format = "console"
		}
	}
	var zc zap.Config
	switch format {
	case "json":
		zc = zap.NewProductionConfig()
		zc.EncoderConfig.EncodeTime = zapcore.RFC3339NanoTimeEncoder
	case "console":
		zc = zap.NewDevelopmentConfig()
		zc.DisableStacktrace = true
	default:
		return nil, fmt.Errorf("--log-format %q: want json or console", o.format)
	}
	zc.Level = zap.NewAtomicLevelAt(level)
	zc.Sampling = nil
	zc.OutputPaths = []string{"stderr"}
	return zc.Build()
}
