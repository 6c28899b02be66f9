package test

// Issue 9, "The server side": the NATS server a node embeds or joins. An
// embedded server reachable from the network must demand credentials and
// can use TLS; a server without JetStream still gets calls served; a
// server that is not up yet is waited for, within --connect-wait.

import (
	"net"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/internal/testkit"
	"github.com/pyfleet/pyfleet/lifecycle"
)

// TestHostileServerListenNeedsCredentials: --listen on anything but
// loopback without credentials is refused with exit 2 and a message naming
// --listen and the flags that fix it; with a token the node serves there,
// and only clients holding the token get in.
func TestHostileServerListenNeedsCredentials(t *testing.T) {
	exposed := []string{"0.0.0.0:0", ":0", "[::]:0", lanIP(t) + ":0"}
	for _, listen := range exposed {
		t.Run("refused "+listen, func(t *testing.T) {
			n := launchNode(t, nodeOptions{workers: 1, extra: []string{"--listen", listen}})
			if code := n.wait(60 * time.Second); code != 2 {
				t.Fatalf("exit %d, want 2\n%s", code, n.log())
			}
			msg := serverStderrLine(n)
			for _, want := range []string{"--listen", listen, "--nats-user", "--nats-password", "--nats-token"} {
				if !strings.Contains(msg, want) {
					t.Errorf("message %q does not name %s", msg, want)
				}
			}
			if len(n.processes()) != 0 {
				t.Errorf("a refused node started processes")
			}
		})
	}

	t.Run("served with a token", func(t *testing.T) {
		const token = "t0ken-for-the-lan"
		n := startNode(t, nodeOptions{workers: 2, extra: []string{"--listen", "0.0.0.0:0", "--nats-token", token}})
		if !strings.HasPrefix(n.url, "nats://0.0.0.0:") {
			t.Fatalf("embedded server at %q, want every interface", n.url)
		}
		if _, err := nats.Connect(n.url, nats.Timeout(5*time.Second)); err == nil || !strings.Contains(strings.ToLower(err.Error()), "authorization violation") {
			t.Fatalf("a client without the token: %v, want an authorization violation", err)
		}
		nc := connectNATS(t, n.url, nats.Token(token))
		assertStillServing(t, n, nc, 2)
	})
}

// TestHostileServerEmbeddedTLS: the TLS flags apply to the embedded server.
// Its clients must use TLS, and with --nats-tls-ca must present a
// certificate that CA signed; the node's own in-process connection needs
// neither, and `submit` with the same flags calls it.
func TestHostileServerEmbeddedTLS(t *testing.T) {
	pki := testkit.NewPKI(t, t.TempDir())
	n := startNode(t, nodeOptions{workers: 2, extra: []string{
		"--nats-tls-cert", pki.ServerCert, "--nats-tls-key", pki.ServerKey, "--nats-tls-ca", pki.CA,
	}})
	if !strings.HasPrefix(n.url, "tls://127.0.0.1:") {
		t.Fatalf("embedded server at %q, want tls://", n.url)
	}
	if _, err := nats.Connect(n.url, nats.Timeout(5*time.Second)); err == nil {
		t.Fatal("a client that does not know the CA got in")
	}
	if _, err := nats.Connect(n.url, nats.Timeout(5*time.Second), nats.RootCAs(pki.CA)); err == nil {
		t.Fatal("a client without a certificate got in")
	}
	testkit.AssertPlainRefused(t, strings.TrimPrefix(n.url, "tls://"))

	tlsFlags := []string{"--nats-tls-ca", pki.CA, "--nats-tls-cert", pki.ClientCert, "--nats-tls-key", pki.ClientKey}
	out, errOut, code := runSubmit(t, n.url, "", append(append([]string{"call"}, tlsFlags...), "echo", `{"over":"tls"}`)...)
	if code != 0 || out != "{\"over\":\"tls\"}\n" {
		t.Errorf("submit call over TLS: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	nc := connectNATS(t, n.url, nats.RootCAs(pki.CA), nats.ClientCert(pki.ClientCert, pki.ClientKey))
	assertStillServing(t, n, nc, 2)
}

// TestHostileServerNoJetStream: against a nats-server without JetStream
// (its default) a node serves calls and publishes events, warns once that
// jobs are off naming the server, and stops cleanly; `submit job` says the
// server has no JetStream instead of hanging.
func TestHostileServerNoJetStream(t *testing.T) {
	srv := startPlainNATS(t, "plain-nats")
	url := srv.url()
	nc := connectNATS(t, url)
	ev := watchEvents(t, nc, "default")

	n := startNode(t, nodeOptions{workers: 2, extra: []string{"--nats", url}})
	ev.waitFor(10*time.Second, kind(lifecycle.KindNodeStarted))
	ev.waitFor(10*time.Second, kind(lifecycle.KindReady))

	warnings := n.serverLogEntries("jobs are off: the NATS server has no JetStream; calls are served")
	if len(warnings) != 1 {
		t.Fatalf("%d 'jobs are off' warnings, want 1\n%s", len(warnings), n.log())
	}
	if w := warnings[0]; w["level"] != "warn" || w["server"] != "plain-nats" || !strings.Contains(w["error"].(string), "plain-nats") {
		t.Errorf("warning %v: want level warn naming the server plain-nats", w)
	}

	for _, args := range [][]string{{"job", "work", `{}`}, {"job", "--wait", "--timeout", "1h", "work", `{}`}} {
		start := time.Now()
		out, errOut, code := runSubmit(t, url, "", args...)
		if code != 3 || !strings.Contains(errOut, "has no JetStream, so jobs are unavailable") || !strings.Contains(errOut, "plain-nats") {
			t.Errorf("submit %v: exit %d, stdout %q, stderr %q; want 3 saying the server has no JetStream", args, code, out, errOut)
		}
		if took := time.Since(start); took > 20*time.Second {
			t.Errorf("submit %v took %s", args, took)
		}
	}
	out, errOut, code := runSubmit(t, url, "", "call", "echo", `{"no":"js"}`)
	if code != 0 || out != "{\"no\":\"js\"}\n" {
		t.Errorf("submit call: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	assertStillServing(t, n, nc, 2)

	// The drain has no jobs to stop.
	n.signal(syscall.SIGTERM)
	if code := n.wait(60 * time.Second); code != 0 {
		t.Fatalf("exit %d after SIGTERM, want 0\n%s", code, n.log())
	}
	ev.waitFor(10*time.Second, kind(lifecycle.KindNodeStopped))
}

// TestHostileServerConnectWait: a --nats server that is not up is retried
// with backoff, each attempt logged, for --connect-wait; then the node exits
// 1 naming the URL. A server that comes up within the wait is joined, and
// a stop during the wait is a clean exit 0. A bad URL or creds file is no
// reason to wait: exit 2 at once.
func TestHostileServerConnectWait(t *testing.T) {
	const retrying = "NATS server not reachable; retrying"

	t.Run("gives up after the wait", func(t *testing.T) {
		addr := "127.0.0.1:" + strconv.Itoa(loopbackPorts(t, 1)[0])
		n := launchNode(t, nodeOptions{workers: 1, extra: []string{"--nats", "nats://pyfleet:s3cret-pw@" + addr, "--connect-wait", "2s"}})
		if code := n.wait(60 * time.Second); code != 1 {
			t.Fatalf("exit %d, want 1\n%s", code, n.log())
		}
		attempts := n.serverLogEntries(retrying)
		if len(attempts) < 2 {
			t.Fatalf("%d attempts logged, want several\n%s", len(attempts), n.log())
		}
		for i, a := range attempts {
			if a["level"] != "warn" || a["attempt"] != float64(i+1) || !strings.Contains(a["url"].(string), addr) || a["error"] == nil {
				t.Errorf("attempt %d logged as %v", i+1, a)
			}
		}
		failed := n.serverLogEntries("failed")
		if len(failed) != 1 || !strings.Contains(failed[0]["error"].(string), addr) || !strings.Contains(failed[0]["error"].(string), "not reachable") {
			t.Errorf("final error %v, want one naming %s", failed, addr)
		}
		if strings.Contains(n.log(), "s3cret-pw") {
			t.Error("the password in the URL reached the log")
		}
	})

	t.Run("server up within the wait", func(t *testing.T) {
		ports := loopbackPorts(t, 2)
		srv := &natsServer{t: t, name: "late", bin: natsServerBinary(t), port: ports[0], httpPort: ports[1],
			scheme: "nats", storeDir: shortTempDir(t)}
		srv.args = []string{"-n", srv.name, "-a", "127.0.0.1", "-p", strconv.Itoa(srv.port), "-m", strconv.Itoa(srv.httpPort),
			"-js", "-sd", srv.storeDir}
		n := launchNode(t, nodeOptions{workers: 2, extra: []string{"--nats", srv.url(), "--connect-wait", "60s"}})
		waitUntil(t, 30*time.Second, "a failed attempt", func() bool { return len(n.serverLogEntries(retrying)) > 0 })
		time.Sleep(time.Second) // a server that comes up a moment later
		srv.start()
		select {
		case <-n.serving:
		case <-n.done:
			t.Fatalf("node exited: %v\n%s", n.err, n.log())
		case <-time.After(90 * time.Second):
			t.Fatalf("node not serving 90 s after the server came up\n%s", n.log())
		}
		nc := connectNATS(t, srv.url())
		out, errOut, code := runSubmit(t, srv.url(), "", "job", "--wait", "--timeout", "60s", "echo", `{"late":1}`)
		if code != 0 || out != "{\"late\":1}\n" {
			t.Errorf("submit job --wait: exit %d, stdout %q, stderr %q", code, out, errOut)
		}
		assertStillServing(t, n, nc, 2)
	})

	t.Run("stop during the wait", func(t *testing.T) {
		addr := "127.0.0.1:" + strconv.Itoa(loopbackPorts(t, 1)[0])
		n := launchNode(t, nodeOptions{workers: 1, extra: []string{"--nats", "nats://" + addr, "--connect-wait", "10m"}})
		waitUntil(t, 30*time.Second, "a failed attempt", func() bool { return len(n.serverLogEntries(retrying)) > 0 })
		start := time.Now()
		n.signal(syscall.SIGINT)
		if code := n.wait(30 * time.Second); code != 0 {
			t.Fatalf("exit %d after SIGINT, want 0\n%s", code, n.log())
		}
		t.Logf("stopped %s after SIGINT", time.Since(start).Round(time.Millisecond))
	})

	t.Run("bad URL or creds exit 2 at once", func(t *testing.T) {
		addr := "127.0.0.1:" + strconv.Itoa(loopbackPorts(t, 1)[0])
		for _, tc := range []struct {
			extra  []string
			naming string
		}{
			{[]string{"--nats", "http://" + addr}, `scheme "http"`},
			{[]string{"--nats", "nats://" + addr, "--nats-creds", "/no/such/pyfleet.creds"}, "/no/such/pyfleet.creds"},
		} {
			n := launchNode(t, nodeOptions{workers: 1, extra: append(tc.extra, "--connect-wait", "10m")})
			if code := n.wait(30 * time.Second); code != 2 {
				t.Fatalf("%v: exit %d, want 2\n%s", tc.extra, code, n.log())
			}
			if msg := serverStderrLine(n); !strings.Contains(msg, tc.naming) {
				t.Errorf("%v: message %q does not name %s", tc.extra, msg, tc.naming)
			}
			if len(n.serverLogEntries(retrying)) != 0 {
				t.Errorf("%v: retried", tc.extra)
			}
		}
	})
}

// startPlainNATS starts a nats-server with its defaults (no JetStream) on
// loopback and waits until a client gets in.
func startPlainNATS(t *testing.T, name string) *natsServer {
	t.Helper()
	ports := loopbackPorts(t, 2)
	s := &natsServer{t: t, name: name, bin: natsServerBinary(t), port: ports[0], httpPort: ports[1], scheme: "nats"}
	s.args = []string{"-n", name, "-a", "127.0.0.1", "-p", strconv.Itoa(s.port), "-m", strconv.Itoa(s.httpPort)}
	s.start()
	waitUntil(t, 30*time.Second, "nats-server "+name+" accepts clients", func() bool {
		if !s.running() {
			t.Fatalf("nats-server %s exited:\n%s", name, s.output())
		}
		nc, err := nats.Connect(s.url(), nats.Timeout(2*time.Second), nats.NoReconnect())
		if err != nil {
			return false
		}
		nc.Close()
		return true
	})
	return s
}

// serverLogEntries returns the node's log entries with this message.
func (n *nodeProc) serverLogEntries(msg string) []map[string]any {
	n.mu.Lock()
	defer n.mu.Unlock()
	var out []map[string]any
	for _, e := range n.logs {
		if e["msg"] == msg {
			out = append(out, e)
		}
	}
	return out
}

// serverStderrLine is poolnode's own one-line report of why it did not start.
func serverStderrLine(n *nodeProc) string {
	for _, line := range strings.Split(n.log(), "\n") {
		if strings.HasPrefix(line, "poolnode: ") {
			return line
		}
	}
	n.t.Fatalf("no 'poolnode: ' line on stderr:\n%s", n.log())
	return ""
}

// lanIP is an address of this machine that is not loopback, or a
// documentation address when it has none: the refusal comes before the
// server binds, so either shows it.
func lanIP(t *testing.T) string {
	t.Helper()
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		if ipn, ok := a.(*net.IPNet); ok && ipn.IP.To4() != nil && !ipn.IP.IsLoopback() {
			return ipn.IP.String()
		}
	}
	return "192.0.2.7"
}
