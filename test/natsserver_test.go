package test

// Helpers that run the real nats-server binary (.tools/bin/nats-server,
// installed by `make tools`) as separate processes: a single server with
// JetStream, a three-server JetStream cluster, servers that demand
// credentials or TLS; and kill -9 and restart of one of them.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// natsServerBinary is the real nats-server that `make tools` installs.
func natsServerBinary(t *testing.T) string {
	t.Helper()
	p := filepath.Join(repoRoot, ".tools", "bin", "nats-server")
	if st, err := os.Stat(p); err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
		t.Fatalf("no nats-server binary at %s: run `make tools` (make test does); it installs github.com/nats-io/nats-server/v2@v2.15.2", p)
	}
	return p
}

// loopbackPorts returns n distinct free TCP ports on 127.0.0.1. They are
// held open together while picked, so they differ from each other; another
// process could still take one before the server binds it, which a
// loopback-only test machine makes unlikely.
func loopbackPorts(t *testing.T, n int) []int {
	t.Helper()
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	ports := make([]int, n)
	for i := range ports {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("pick a free port: %v", err)
		}
		ls = append(ls, l)
		ports[i] = l.Addr().(*net.TCPAddr).Port
	}
	return ports
}

// natsServer is one nats-server process started by a test. kill and
// restart keep its ports, config and store dir.
type natsServer struct {
	t        *testing.T
	name     string
	bin      string
	args     []string
	port     int    // client port
	httpPort int    // monitoring port
	scheme   string // nats or tls
	storeDir string
	// clientOpts are what a client needs to get in (credentials, CA):
	// the readiness check uses them.
	clientOpts []nats.Option

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
	out  *syncBuffer
	runs int
}

// natsServerSpec describes a server to start.
type natsServerSpec struct {
	name string
	// config is extra nats-server configuration (authorization, tls,
	// cluster blocks); the listen, http, server_name and jetstream
	// settings are written by startNATSServer.
	config string
	// tls makes the client URL tls://.
	tls        bool
	clientOpts []nats.Option
	// ports: client, http; zero picks free ones.
	port, httpPort int
	storeDir       string
}

// url is the client URL of the server.
func (s *natsServer) url() string {
	return fmt.Sprintf("%s://127.0.0.1:%d", s.scheme, s.port)
}

// startNATSJetStream starts a single nats-server with JetStream, from the
// command line only (-js -sd), and waits until it serves JetStream.
func startNATSJetStream(t *testing.T, name string) *natsServer {
	t.Helper()
	ports := loopbackPorts(t, 2)
	s := &natsServer{
		t: t, name: name, bin: natsServerBinary(t), port: ports[0], httpPort: ports[1],
		scheme: "nats", storeDir: shortTempDir(t),
	}
	s.args = []string{
		"-n", name, "-a", "127.0.0.1", "-p", strconv.Itoa(s.port), "-m", strconv.Itoa(s.httpPort),
		"-js", "-sd", s.storeDir,
	}
	s.start()
	s.waitReady(30*time.Second, false)
	return s
}

// startNATSServer writes a config file for spec and starts a nats-server
// with JetStream from it; it does not wait (see waitReady).
func startNATSServer(t *testing.T, spec natsServerSpec) *natsServer {
	t.Helper()
	if spec.port == 0 || spec.httpPort == 0 {
		ports := loopbackPorts(t, 2)
		spec.port, spec.httpPort = ports[0], ports[1]
	}
	if spec.storeDir == "" {
		spec.storeDir = shortTempDir(t)
	}
	s := &natsServer{
		t: t, name: spec.name, bin: natsServerBinary(t), port: spec.port, httpPort: spec.httpPort,
		scheme: "nats", storeDir: spec.storeDir, clientOpts: spec.clientOpts,
	}
	if spec.tls {
		s.scheme = "tls"
	}
	conf := fmt.Sprintf("server_name: %q\nlisten: \"127.0.0.1:%d\"\nhttp: \"127.0.0.1:%d\"\njetstream {\n  store_dir: %q\n}\n%s\n",
		spec.name, spec.port, spec.httpPort, spec.storeDir, spec.config)
	confFile := filepath.Join(shortTempDir(t), spec.name+".conf")
	if err := os.WriteFile(confFile, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	s.args = []string{"-c", confFile}
	s.start()
	return s
}

func (s *natsServer) start() {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	cmd := exec.Command(s.bin, s.args...)
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	// If the test binary dies without its cleanups (a go test timeout),
	// the server goes with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		s.t.Fatalf("start nats-server %s: %v", s.name, err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	s.cmd, s.done, s.out = cmd, done, out
	s.runs++
	if s.runs == 1 {
		s.t.Cleanup(func() {
			s.kill()
			if s.t.Failed() {
				s.t.Logf("nats-server %s output (last run):\n%s", s.name, tail(s.output(), 4000))
			}
		})
	}
}

// kill sends SIGKILL and reaps the process; a no-op if it is not running.
func (s *natsServer) kill() {
	s.mu.Lock()
	cmd, done := s.cmd, s.done
	s.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGKILL)
	<-done
}

// restart starts the server again with the same ports, config and store;
// the caller waits for it with waitReady.
func (s *natsServer) restart() {
	s.t.Helper()
	s.kill()
	s.start()
}

func (s *natsServer) running() bool {
	s.mu.Lock()
	done := s.done
	s.mu.Unlock()
	select {
	case <-done:
		return false
	default:
		return true
	}
}

func (s *natsServer) output() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.out.String()
}

// waitReady waits until the server's /healthz says it is healthy (which in
// a cluster needs a JetStream meta leader and current assets), a client
// gets in and JetStream answers account info; with cluster, until /jsz also
// names a meta leader.
func (s *natsServer) waitReady(timeout time.Duration, cluster bool) {
	s.t.Helper()
	deadline := time.Now().Add(timeout)
	var last error
	for {
		if !s.running() {
			s.t.Fatalf("nats-server %s exited while starting:\n%s", s.name, tail(s.output(), 4000))
		}
		if last = s.ready(cluster); last == nil {
			return
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("nats-server %s not ready after %s: %v\n%s", s.name, timeout, last, tail(s.output(), 4000))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (s *natsServer) ready(cluster bool) error {
	hc := http.Client{Timeout: 2 * time.Second}
	resp, err := hc.Get(fmt.Sprintf("http://127.0.0.1:%d/healthz", s.httpPort))
	if err != nil {
		return err
	}
	body := new(bytes.Buffer)
	_, _ = body.ReadFrom(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("healthz %d: %s", resp.StatusCode, strings.TrimSpace(body.String()))
	}
	if cluster {
		if leader, err := s.metaLeader(); err != nil {
			return err
		} else if leader == "" {
			return fmt.Errorf("no JetStream meta leader yet")
		}
	}
	opts := append([]nats.Option{nats.Timeout(2 * time.Second), nats.NoReconnect()}, s.clientOpts...)
	nc, err := nats.Connect(s.url(), opts...)
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if _, err := js.AccountInfo(ctx); err != nil {
		return fmt.Errorf("JetStream account info: %w", err)
	}
	return nil
}

// metaLeader is the JetStream meta leader this server knows of.
func (s *natsServer) metaLeader() (string, error) {
	hc := http.Client{Timeout: 2 * time.Second}
	resp, err := hc.Get(fmt.Sprintf("http://127.0.0.1:%d/jsz", s.httpPort))
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	var jsz struct {
		Meta *struct {
			Leader      string `json:"leader"`
			ClusterSize int    `json:"cluster_size"`
		} `json:"meta_cluster"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&jsz); err != nil {
		return "", fmt.Errorf("jsz: %w", err)
	}
	if jsz.Meta == nil {
		return "", fmt.Errorf("jsz: no meta_cluster")
	}
	return jsz.Meta.Leader, nil
}

// natsCluster is a JetStream cluster of nats-server processes on loopback.
type natsCluster struct {
	t       *testing.T
	servers []*natsServer
}

// startNATSCluster starts n servers (n >= 3 for R3 streams), each from its
// own config file with routes to the others, and waits until every one is
// healthy and a meta leader is elected.
func startNATSCluster(t *testing.T, n int) *natsCluster {
	t.Helper()
	ports := loopbackPorts(t, 3*n) // client, http, route per server
	c := &natsCluster{t: t}
	for i := range n {
		var routes []string
		for j := range n {
			if j != i {
				routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", ports[3*j+2]))
			}
		}
		cfg := fmt.Sprintf("cluster {\n  name: pyfleet-test\n  listen: \"127.0.0.1:%d\"\n  routes: [%s]\n}\n",
			ports[3*i+2], strings.Join(routes, ", "))
		c.servers = append(c.servers, startNATSServer(t, natsServerSpec{
			name: fmt.Sprintf("s%d", i+1), config: cfg, port: ports[3*i], httpPort: ports[3*i+1],
		}))
	}
	for _, s := range c.servers {
		s.waitReady(60*time.Second, true)
	}
	return c
}

// urls is the comma-separated list of every server's client URL.
func (c *natsCluster) urls() string {
	var us []string
	for _, s := range c.servers {
		us = append(us, s.url())
	}
	return strings.Join(us, ",")
}

// server returns the server with this name (as in a stream's cluster info).
func (c *natsCluster) server(name string) *natsServer {
	for _, s := range c.servers {
		if s.name == name {
			return s
		}
	}
	c.t.Fatalf("no server %q in the cluster", name)
	return nil
}

// connectNATS connects a test client that reconnects forever (through
// server kills) and is closed at cleanup.
func connectNATS(t *testing.T, urls string, opts ...nats.Option) *nats.Conn {
	t.Helper()
	all := append([]nats.Option{
		nats.Timeout(5 * time.Second), nats.MaxReconnects(-1), nats.ReconnectWait(250 * time.Millisecond),
	}, opts...)
	nc, err := nats.Connect(urls, all...)
	if err != nil {
		t.Fatalf("connect to %s: %v", urls, err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// syncBuffer is a bytes.Buffer safe for a process's output copier and
// the test reading it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "...\n" + s[len(s)-n:]
}
