package bus_test

import (
	"context"
	"errors"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/pyfleet/pyfleet/bus"
	"github.com/pyfleet/pyfleet/internal/testkit"
)

func TestLoopbackHost(t *testing.T) {
	for host, want := range map[string]bool{
		"127.0.0.1": true, "127.1.2.3": true, "::1": true, "[::1]": true, "localhost": true, "LOCALHOST": true,
		"::ffff:127.0.0.1": true,
		"0.0.0.0":          false, "::": false, "": false, "192.168.1.10": false, "10.0.0.1": false,
		"example.com": false, "localhost.example.com": false, "128.0.0.1": false,
	} {
		if got := bus.LoopbackHost(host); got != want {
			t.Errorf("LoopbackHost(%q) = %v, want %v", host, got, want)
		}
	}
}

// TestStartEmbeddedRefusesExposedListen: a server anyone on the network
// could use is refused before it binds; with credentials it starts.
func TestStartEmbeddedRefusesExposedListen(t *testing.T) {
	for _, listen := range []string{"0.0.0.0:0", "[::]:0", "192.0.2.7:0", "example.com:0"} {
		for _, cfg := range []bus.EmbeddedConfig{
			{},
			{User: "u"}, // a user with no password proves nothing
			{TLSCA: "/ca.pem"},
		} {
			cfg.Listen, cfg.StoreDir = listen, t.TempDir()
			_, err := bus.StartEmbedded(cfg, zaptest.NewLogger(t))
			if err == nil || !strings.Contains(err.Error(), "not loopback") || !strings.Contains(err.Error(), listen) {
				t.Errorf("StartEmbedded(%+v) = %v, want a refusal naming %s", cfg, err, listen)
			}
		}
	}
	for _, cfg := range []bus.EmbeddedConfig{
		{Listen: "0.0.0.0:0", Token: "tok"},
		{Listen: "0.0.0.0:0", User: "u", Password: "pw"},
		{Listen: "localhost:0"},
	} {
		cfg.StoreDir = t.TempDir()
		srv, err := bus.StartEmbedded(cfg, zaptest.NewLogger(t))
		if err != nil {
			t.Errorf("StartEmbedded(%+v): %v", cfg, err)
			continue
		}
		srv.Shutdown()
		srv.WaitForShutdown()
	}
}

// TestEmbeddedTLS: with a certificate the embedded server takes TLS
// clients only; with a CA too, only clients holding a certificate it
// signed. The in-process connection needs neither.
func TestEmbeddedTLS(t *testing.T) {
	pki := testkit.NewPKI(t, t.TempDir())
	start := func(ca string) *server.Server {
		srv, err := bus.StartEmbedded(bus.EmbeddedConfig{Listen: "127.0.0.1:0", StoreDir: t.TempDir(),
			TLSCert: pki.ServerCert, TLSKey: pki.ServerKey, TLSCA: ca}, zaptest.NewLogger(t))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { srv.Shutdown(); srv.WaitForShutdown() })
		if !strings.HasPrefix(srv.ClientURL(), "tls://") {
			t.Errorf("ClientURL %s, want tls://", srv.ClientURL())
		}
		return srv
	}
	connect := func(url string, opts ...nats.Option) error {
		nc, err := nats.Connect(url, append(opts, nats.Timeout(5*time.Second))...)
		if err == nil {
			nc.Close()
		}
		return err
	}

	t.Run("server certificate", func(t *testing.T) {
		srv := start("")
		if err := connect(srv.ClientURL(), nats.RootCAs(pki.CA)); err != nil {
			t.Errorf("client with the CA: %v", err)
		}
		if err := connect(srv.ClientURL()); err == nil || !strings.Contains(err.Error(), "certificate") {
			t.Errorf("client without the CA: %v, want a certificate error", err)
		}
		testkit.AssertPlainRefused(t, strings.TrimPrefix(srv.ClientURL(), "tls://"))
		nc, err := bus.Connect(bus.ConnConfig{InProcess: srv, TLSCA: "/not/used.pem"}, nil)
		if err != nil {
			t.Fatalf("in-process: %v", err)
		}
		nc.Close()
	})

	t.Run("client certificates", func(t *testing.T) {
		srv := start(pki.CA)
		if err := connect(srv.ClientURL(), nats.RootCAs(pki.CA), nats.ClientCert(pki.ClientCert, pki.ClientKey)); err != nil {
			t.Errorf("client with a certificate: %v", err)
		}
		if err := connect(srv.ClientURL(), nats.RootCAs(pki.CA)); err == nil {
			t.Error("a client without a certificate got in")
		}
		testkit.AssertPlainRefused(t, strings.TrimPrefix(srv.ClientURL(), "tls://"))
		nc, err := bus.Connect(bus.ConnConfig{InProcess: srv}, nil)
		if err != nil {
			t.Fatalf("in-process: %v", err)
		}
		if err := nc.Flush(); err != nil {
			t.Errorf("in-process flush: %v", err)
		}
		nc.Close()
	})

	t.Run("loopback not required with client certificates", func(t *testing.T) {
		srv, err := bus.StartEmbedded(bus.EmbeddedConfig{Listen: "0.0.0.0:0", StoreDir: t.TempDir(),
			TLSCert: pki.ServerCert, TLSKey: pki.ServerKey, TLSCA: pki.CA}, zaptest.NewLogger(t))
		if err != nil {
			t.Fatal(err)
		}
		srv.Shutdown()
		srv.WaitForShutdown()
	})
}

// freeAddr is a loopback address nothing listens on (for a moment).
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// observedLogger records what is logged. It does not also write to t: the
// NATS connection's closed handler runs on nats.go's own goroutine after
// Close returns, possibly after the test has ended.
func observedLogger() (*zap.Logger, *observer.ObservedLogs) {
	core, logs := observer.New(zapcore.DebugLevel)
	return zap.New(core), logs
}

// TestConnectWaitsForServer: a server that is not up is retried with
// logged attempts until Wait; one that comes up within it is joined.
func TestConnectWaitsForServer(t *testing.T) {
	t.Run("never up", func(t *testing.T) {
		addr := freeAddr(t)
		log, logs := observedLogger()
		start := time.Now()
		_, err := bus.ConnectContext(t.Context(), bus.ConnConfig{URLs: "nats://u:secretpw@" + addr, Wait: 1500 * time.Millisecond}, log)
		took := time.Since(start)
		if !errors.Is(err, bus.ErrUnreachable) || !strings.Contains(err.Error(), addr) || !strings.Contains(err.Error(), "connection refused") {
			t.Fatalf("err %v, want ErrUnreachable naming %s and the refusal", err, addr)
		}
		if took < 1500*time.Millisecond {
			t.Errorf("gave up after %s, before the wait", took)
		}
		attempts := logs.FilterMessage("NATS server not reachable; retrying").All()
		if len(attempts) < 3 {
			t.Fatalf("%d attempts logged, want several", len(attempts))
		}
		for i, e := range attempts {
			f := e.ContextMap()
			if f["attempt"] != int64(i+1) || !strings.Contains(f["url"].(string), addr) || f["error"] == nil || e.Level != zapcore.WarnLevel {
				t.Errorf("attempt log %d: %v %v", i+1, e.Level, f)
			}
			if strings.Contains(f["url"].(string), "secretpw") {
				t.Errorf("password in the log: %v", f["url"])
			}
		}
		if strings.Contains(err.Error(), "secretpw") {
			t.Errorf("password in the error: %v", err)
		}
	})

	t.Run("no wait: one attempt, still unreachable", func(t *testing.T) {
		log, logs := observedLogger()
		_, err := bus.ConnectContext(t.Context(), bus.ConnConfig{URLs: "nats://" + freeAddr(t)}, log)
		if !errors.Is(err, bus.ErrUnreachable) {
			t.Errorf("err %v, want ErrUnreachable", err)
		}
		if n := logs.FilterMessage("NATS server not reachable; retrying").Len(); n != 0 {
			t.Errorf("%d retries without a wait", n)
		}
	})

	t.Run("up within the wait", func(t *testing.T) {
		addr := freeAddr(t)
		var wg sync.WaitGroup
		defer wg.Wait()
		log, logs := observedLogger()
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		wg.Go(func() {
			// Start the server once the node has failed at least once.
			for logs.FilterMessage("NATS server not reachable; retrying").Len() == 0 {
				select {
				case <-ctx.Done():
					return
				case <-time.After(10 * time.Millisecond):
				}
			}
			srv, err := bus.StartEmbedded(bus.EmbeddedConfig{Listen: addr, StoreDir: t.TempDir()}, zaptest.NewLogger(t))
			if err != nil {
				t.Errorf("StartEmbedded: %v", err)
				return
			}
			t.Cleanup(func() { srv.Shutdown(); srv.WaitForShutdown() })
		})
		nc, err := bus.ConnectContext(ctx, bus.ConnConfig{URLs: "nats://" + addr, Wait: 30 * time.Second}, log)
		if err != nil {
			t.Fatalf("ConnectContext: %v", err)
		}
		defer nc.Close()
		if err := nc.Flush(); err != nil {
			t.Error(err)
		}
	})

	t.Run("stop during the wait", func(t *testing.T) {
		ctx, cancel := context.WithCancel(t.Context())
		log, logs := observedLogger()
		var wg sync.WaitGroup
		defer wg.Wait()
		wg.Go(func() {
			for logs.FilterMessage("NATS server not reachable; retrying").Len() < 2 {
				time.Sleep(10 * time.Millisecond)
			}
			cancel()
		})
		start := time.Now()
		_, err := bus.ConnectContext(ctx, bus.ConnConfig{URLs: "nats://" + freeAddr(t), Wait: time.Minute}, log)
		if !errors.Is(err, context.Canceled) {
			t.Errorf("err %v, want context.Canceled", err)
		}
		if took := time.Since(start); took > 20*time.Second {
			t.Errorf("stop took %s", took)
		}
	})

	t.Run("stop during a silent handshake", func(t *testing.T) {
		// A peer that accepts and never sends INFO holds nats.go for its
		// whole handshake timeout (5 s) unless the stop closes the socket.
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		defer wg.Wait()
		defer l.Close()
		wg.Go(func() {
			var conns []net.Conn
			defer func() {
				for _, c := range conns {
					c.Close()
				}
			}()
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				conns = append(conns, c)
			}
		})
		ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err = bus.ConnectContext(ctx, bus.ConnConfig{URLs: "nats://" + l.Addr().String(), Wait: time.Minute}, nil)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("err %v, want the context's", err)
		}
		if took := time.Since(start); took > 3*time.Second {
			t.Errorf("stop took %s: the handshake was sat out", took)
		}
	})

	t.Run("turned away at once", func(t *testing.T) {
		srv, err := bus.StartEmbedded(bus.EmbeddedConfig{Listen: "127.0.0.1:0", StoreDir: t.TempDir(), Token: "tok"}, zaptest.NewLogger(t))
		if err != nil {
			t.Fatal(err)
		}
		defer func() { srv.Shutdown(); srv.WaitForShutdown() }()
		log, logs := observedLogger()
		_, err = bus.ConnectContext(t.Context(), bus.ConnConfig{URLs: srv.ClientURL(), Token: "wrong", Wait: time.Minute}, log)
		if err == nil || errors.Is(err, bus.ErrUnreachable) || !strings.Contains(err.Error(), "authorization violation") {
			t.Errorf("wrong token: %v, want an authorization violation at once", err)
		}
		_, err = bus.ConnectContext(t.Context(), bus.ConnConfig{URLs: srv.ClientURL(), Creds: "/no/such.creds", Wait: time.Minute}, log)
		if err == nil || errors.Is(err, bus.ErrUnreachable) || !strings.Contains(err.Error(), "/no/such.creds") {
			t.Errorf("missing creds file: %v, want it named at once", err)
		}
		if n := logs.FilterMessage("NATS server not reachable; retrying").Len(); n != 0 {
			t.Errorf("%d retries of a refusal", n)
		}
	})
}

// TestCheckJetStream tells a server without JetStream (nats-server's
// default) from one with it, and names the server.
func TestCheckJetStream(t *testing.T) {
	if err := bus.CheckJetStream(t.Context(), MustConn(t, MustServer(t))); err != nil {
		t.Errorf("with JetStream: %v", err)
	}
	plain, err := server.NewServer(&server.Options{ServerName: "plain-one", Host: "127.0.0.1", Port: server.RANDOM_PORT, NoSigs: true, NoLog: true})
	if err != nil {
		t.Fatal(err)
	}
	plain.Start()
	defer func() { plain.Shutdown(); plain.WaitForShutdown() }()
	if !plain.ReadyForConnections(10 * time.Second) {
		t.Fatal("not ready")
	}
	err = bus.CheckJetStream(t.Context(), MustConn(t, plain))
	if !errors.Is(err, bus.ErrNoJetStream) || !strings.Contains(err.Error(), `"plain-one"`) || !strings.Contains(err.Error(), strconv.Itoa(plain.Addr().(*net.TCPAddr).Port)) {
		t.Errorf("without JetStream: %v, want ErrNoJetStream naming the server", err)
	}
}
