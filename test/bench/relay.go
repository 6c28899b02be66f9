package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
	"go.uber.org/zap"

	"github.com/pyfleet/pyfleet/bus"
	"github.com/pyfleet/pyfleet/proto/workerpb"
)

// The relay is the floor of any bridge from NATS to these workers: a
// process with the node's embedded NATS server (bus.StartEmbedded, the
// caller over loopback TCP, the relay's own connection in process), one
// plain subscription, and the workers' Batches streams driven as the node
// drives them (streamClient's batching), answering each request from the
// stream's receiver. No micro service, admission, deadlines, heartbeats,
// metrics or events: everything the node does beyond carrying a request
// to a worker and its answer back. The stream ceiling says what the
// workers can do; the relay, run against the same workers in the same
// run, says what is left of that once every call crosses NATS on the
// same two cores, and so what a node can reach at best (issue 14's request-path
// targets are measured against both; test/bench/notes.md).

// relayArg, as the bench binary's first argument, makes it the relay
// (relayMain); the harness starts it with its own executable.
const relayArg = "__pyfleet_bench_relay"

// relaySubject is what the relay serves: relaySubject.FUNCTION.
const relaySubject = "relay.req"

// relayConfig comes on the relay's stdin, one JSON line, so that the
// workers' secrets stay off its command line.
type relayConfig struct {
	Workers []relayWorker `json:"workers"`
	Store   string        `json:"store"`   // JetStream store dir, as the node's server has one
	Profile string        `json:"profile"` // a CPU profile of the relay's whole life goes here, if set
}

type relayWorker struct {
	Socket string `json:"socket"`
	Secret string `json:"secret"`
}

// relayMain is the relay process: it prints "RELAY-READY URL" once it
// serves, and exits when its stdin closes or on SIGTERM.
func relayMain() int {
	fail := func(err error) int {
		fmt.Fprintln(os.Stderr, "bench relay:", err)
		return 1
	}
	in := bufio.NewReader(os.Stdin)
	line, err := in.ReadBytes('\n')
	if err != nil {
		return fail(fmt.Errorf("read the config: %w", err))
	}
	var cfg relayConfig
	if err := json.Unmarshal(line, &cfg); err != nil {
		return fail(fmt.Errorf("config: %w", err))
	}
	if cfg.Profile != "" {
		f, err := os.Create(cfg.Profile)
		if err != nil {
			return fail(err)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return fail(err)
		}
		defer pprof.StopCPUProfile()
	}
	srv, err := bus.StartEmbedded(bus.EmbeddedConfig{Listen: "127.0.0.1:0", StoreDir: cfg.Store}, zap.NewNop())
	if err != nil {
		return fail(err)
	}
	defer func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	}()
	nc, err := nats.Connect("", nats.InProcessServer(srv))
	if err != nil {
		return fail(err)
	}
	defer nc.Close()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var streams []*streamClient
	for _, w := range cfg.Workers {
		conn, err := dialWorker(w.Socket, w.Secret)
		if err != nil {
			return fail(err)
		}
		defer conn.Close()
		s, err := openStream(ctx, conn)
		if err != nil {
			return fail(fmt.Errorf("open a stream to %s: %w", w.Socket, err))
		}
		defer s.close()
		streams = append(streams, s)
	}
	if len(streams) == 0 {
		return fail(errors.New("no workers"))
	}

	var next atomic.Uint64
	prefix := relaySubject + "."
	sub, err := nc.Subscribe(prefix+"*", func(m *nats.Msg) {
		s := streams[next.Add(1)%uint64(len(streams))]
		err := s.start(strings.TrimPrefix(m.Subject, prefix), m.Data, func(r *workerpb.Result) {
			if r == nil {
				relayError(m, 503, "the worker's stream ended")
			} else if r.Error != nil {
				relayError(m, int(r.Error.Code), r.Error.Message)
			} else {
				_ = m.Respond(r.Payload)
			}
		})
		if err != nil {
			relayError(m, 503, err.Error())
		}
	})
	if err != nil {
		return fail(err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := nc.Flush(); err != nil {
		return fail(err)
	}
	fmt.Printf("RELAY-READY %s\n", srv.ClientURL())

	stdinClosed := make(chan struct{})
	go func() {
		defer close(stdinClosed)
		_, _ = in.WriteTo(io.Discard)
	}()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	select {
	case <-stdinClosed:
	case <-sigs:
	}
	return 0
}

// relayError answers m as micro does an error, which natsCaller reads.
func relayError(m *nats.Msg, code int, text string) {
	reply := nats.NewMsg(m.Reply)
	reply.Header.Set(micro.ErrorCodeHeader, strconv.Itoa(code))
	reply.Header.Set(micro.ErrorHeader, text)
	_ = m.RespondMsg(reply)
}

// relay is the harness's handle on a running relay.
type relay struct {
	p     *proc
	stdin *os.File
	nc    *nats.Conn
}

// startRelay starts the relay in front of ws and connects to it.
func (h *harness) startRelay(ctx context.Context, ws []*pyWorker) (*relay, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cfg := relayConfig{Store: filepath.Join(h.tmp, "relay-js")}
	if h.profile != "" {
		cfg.Profile = filepath.Join(h.profile, "relay.pprof")
	}
	for _, w := range ws {
		cfg.Workers = append(cfg.Workers, relayWorker{Socket: w.sock, Secret: w.secret})
	}
	line, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	sr, sw, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(exe, relayArg)
	cmd.Stdin = sr
	ready := make(chan string, 1)
	p, err := h.ps.start("relay", cmd, func(l string) {
		if strings.HasPrefix(l, "RELAY-READY ") {
			select {
			case ready <- strings.TrimPrefix(l, "RELAY-READY "):
			default:
			}
		}
	})
	sr.Close()
	if err != nil {
		sw.Close()
		return nil, err
	}
	r := &relay{p: p, stdin: sw}
	if _, err := sw.Write(append(line, '\n')); err != nil {
		r.close()
		return nil, fmt.Errorf("relay: write its config: %w", err)
	}
	select {
	case url := <-ready:
		if r.nc, err = nats.Connect(url); err != nil {
			r.close()
			return nil, fmt.Errorf("relay: connect: %w", err)
		}
		return r, nil
	case <-p.done:
		r.close()
		return nil, fmt.Errorf("relay exited before serving:\n%s", p.tail())
	case <-time.After(30 * time.Second):
		r.close()
		return nil, fmt.Errorf("relay: not serving after 30 s:\n%s", p.tail())
	case <-ctx.Done():
		r.close()
		return nil, ctx.Err()
	}
}

// close ends the relay: its stdin closes, and it exits (or is killed
// after 5 s).
func (r *relay) close() {
	if r.nc != nil {
		r.nc.Close()
	}
	r.stdin.Close()
	r.p.stop(5 * time.Second)
}
