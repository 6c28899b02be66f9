package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/pyfleet/pyfleet/lifecycle"
	"github.com/pyfleet/pyfleet/proto/workerpb"
)

// node is a poolnode the harness started.
type node struct {
	name    string
	p       *proc
	natsURL string
	metrics string // host:port of --metrics, if any
	nc      *nats.Conn
}

// workers lists the node's worker pids: its children that run
// pyfleet.worker (not its guardian), or where each worker runs under the
// init of its PID namespace, the inits' children that do.
func (n *node) workers() []int {
	var out []int
	for _, pid := range childrenOf(n.p.pid()) {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
		// The init first: its command line holds its worker's.
		switch {
		case err != nil:
		case strings.Contains(string(b), "\x00"+lifecycle.InitArg+"\x00"):
			for _, child := range childrenOf(pid) {
				if b, err := os.ReadFile("/proc/" + strconv.Itoa(child) + "/cmdline"); err == nil && strings.Contains(string(b), "pyfleet.worker") {
					out = append(out, child)
				}
			}
		case strings.Contains(string(b), "pyfleet.worker"):
			out = append(out, pid)
		}
	}
	return out
}

type nodeOpts struct {
	workers, concurrency int
	natsURL              string // empty: the node runs its embedded server on a free port
	metrics              bool   // serve --metrics (with /debug/pprof) on a free port
	wait                 bool   // return once a request is answered
	containment          string // --containment, if not empty
	maxRequests          int    // --max-requests, if not 0
	preload              bool   // --preload
	app                  string // module in test/bench (default benchapp)
	env                  []string
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// startNode starts a poolnode serving test/bench/benchapp.py, in its own state dir.
func (h *harness) startNode(ctx context.Context, short string, o nodeOpts) (*node, error) {
	name := h.id + "-" + short
	state := filepath.Join(h.tmp, "state-"+short)
	args := []string{
		"--node", name,
		"--state-dir", state,
		"--python", h.python,
		"--app", "benchapp",
		"--app-dir", filepath.Join(h.root, "test", "bench"),
		"--workers", strconv.Itoa(o.workers),
		"--concurrency", strconv.Itoa(o.concurrency),
		"--log-format", "json",
		"--log-level", "warn",
	}
	if o.containment != "" {
		args = append(args, "--containment", o.containment)
	}
	if o.preload {
		args = append(args, "--preload")
	}
	if o.app != "" {
		args[slices.Index(args, "benchapp")] = o.app
	}
	if o.maxRequests > 0 {
		args = append(args, "--max-requests", strconv.Itoa(o.maxRequests))
	}
	n := &node{name: name}
	if o.natsURL != "" {
		n.natsURL = o.natsURL
		args = append(args, "--nats", o.natsURL)
	} else {
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		n.natsURL = "nats://127.0.0.1:" + strconv.Itoa(port)
		args = append(args, "--listen", "127.0.0.1:"+strconv.Itoa(port))
	}
	env := append(childEnv(o.env...), h.nodeEnv...)
	if o.metrics {
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		n.metrics = "127.0.0.1:" + strconv.Itoa(port)
		args = append(args, "--metrics", n.metrics)
		env = append(env, "PYFLEET_PPROF=1")
	}
	cmd := exec.Command(h.poolnode, args...)
	cmd.Dir = h.root
	cmd.Env = env
	p, err := h.ps.start("poolnode-"+short, cmd, nil)
	if err != nil {
		return nil, err
	}
	n.p = p
	if !o.wait {
		return n, nil
	}
	if err := n.waitServing(ctx, 3*time.Minute); err != nil {
		p.kill()
		return nil, fmt.Errorf("poolnode %s: %w\n%s", short, err, p.tail())
	}
	return n, nil
}

// waitServing connects to the node's NATS and waits until it answers echo.
func (n *node) waitServing(ctx context.Context, within time.Duration) error {
	end := time.Now().Add(within)
	for {
		if n.p.exited() {
			return errors.New("exited")
		}
		if time.Now().After(end) {
			return errors.New("not serving in time")
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if n.nc == nil {
			nc, err := nats.Connect(n.natsURL, nats.Name("bench"), nats.MaxReconnects(-1))
			if err != nil {
				time.Sleep(20 * time.Millisecond)
				continue
			}
			n.nc = nc
		}
		m, err := n.nc.Request("pyfleet.req.default.echo", []byte(`{"ping":1}`), 5*time.Second)
		if err == nil && m.Header.Get(micro.ErrorCodeHeader) == "" {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (n *node) close() {
	if n.nc != nil {
		n.nc.Close()
	}
	n.p.stop(15 * time.Second)
}

// fetch GETs a path from the node's metrics server into file.
func (n *node) fetch(ctx context.Context, path, file string) error {
	req, err := http.NewRequestWithContext(ctx, "GET", "http://"+n.metrics+path, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("%s: %s: %s", path, resp.Status, b)
	}
	f, err := os.Create(file)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(f, resp.Body)
	return err
}

// pyWorker is a Python worker the harness runs itself, as a node would, to
// call it directly: the ceiling.
type pyWorker struct {
	p            *proc
	conn         *grpc.ClientConn
	lifeline     *os.File
	sock, secret string // for the relay's own connection
}

type secretCreds string

func (s secretCreds) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"pyfleet-secret": string(s)}, nil
}

func (secretCreds) RequireTransportSecurity() bool { return false }

// startWorker starts `python -m pyfleet.worker` on benchapp, the way
// poolnode does (same flags, lifeline, secret), and dials it.
func (h *harness) startWorker(ctx context.Context, short string, concurrency int) (*pyWorker, error) {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	secret := hex.EncodeToString(b)
	sock := filepath.Join(h.tmp, short+".sock")
	// The secret on a pipe of its own, written and closed before the start.
	sr, sw, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	_, err = sw.WriteString(secret)
	sw.Close()
	if err != nil {
		sr.Close()
		return nil, err
	}
	defer sr.Close()
	lr, lw, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(h.python, "-m", "pyfleet.worker",
		"--app", "benchapp",
		"--app-dir", filepath.Join(h.root, "test", "bench"),
		"--socket", sock,
		"--worker-id", short,
		"--concurrency", strconv.Itoa(concurrency))
	cmd.Dir = filepath.Join(h.root, "test", "bench")
	cmd.Env = childEnv(
		"PYFLEET_WORKER_LIFELINE_FD=3",
		"PYFLEET_WORKER_SECRET_FD=4",
		// The same marker a node sets, under a node name no node uses, so
		// that the leftover check finds these too.
		"PYFLEET_WORKER_RUN="+h.id+"-ceiling/"+short,
	)
	cmd.ExtraFiles = []*os.File{lr, sr}
	ready := make(chan string, 1)
	p, err := h.ps.start("worker-"+short, cmd, func(line string) {
		if strings.HasPrefix(line, "PYFLEET-") {
			select {
			case ready <- line:
			default:
			}
		}
	})
	lr.Close()
	if err != nil {
		lw.Close()
		return nil, err
	}
	w := &pyWorker{p: p, lifeline: lw, sock: sock, secret: secret}
	fail := func(err error) (*pyWorker, error) {
		w.close()
		return nil, fmt.Errorf("worker %s: %w\n%s", short, err, p.tail())
	}
	select {
	case line := <-ready:
		if !strings.HasPrefix(line, "PYFLEET-READY ") {
			return fail(errors.New(line))
		}
	case <-p.done:
		return fail(errors.New("exited before its handshake"))
	case <-time.After(60 * time.Second):
		return fail(errors.New("no handshake in 60 s"))
	case <-ctx.Done():
		return fail(ctx.Err())
	}
	conn, err := dialWorker(sock, secret)
	if err != nil {
		return fail(err)
	}
	w.conn = conn
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	r, err := workerpb.NewWorkerClient(conn).Unary(cctx, &workerpb.Call{Id: 1, Function: "echo", Payload: []byte(`{"ping":1}`)})
	if err != nil {
		return fail(err)
	}
	if r.Error != nil {
		return fail(fmt.Errorf("echo: %s", r.Error.Message))
	}
	return w, nil
}

// dialWorker connects to a worker's socket with the node's dial options
// (pool/worker.go workerDialOptions).
func dialWorker(sock, secret string) (*grpc.ClientConn, error) {
	return grpc.NewClient("unix:"+sock,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithPerRPCCredentials(secretCreds(secret)),
		grpc.WithInitialWindowSize(4<<20),
		grpc.WithInitialConnWindowSize(16<<20),
		grpc.WithSharedWriteBuffer(true))
}

func (w *pyWorker) close() {
	if w.conn != nil {
		w.conn.Close()
	}
	w.p.stop(5 * time.Second)
	w.lifeline.Close()
}
