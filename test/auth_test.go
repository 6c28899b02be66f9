package test

import (
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/internal/testkit"
)

// TestNATSAuthAndTLS is issue 4's fifth test, against real nats-server
// processes that demand credentials: one with a user and password, one
// that also demands TLS with client certificates (verify) from a CA made
// here. A poolnode with wrong or missing credentials (or without the CA,
// or without a client certificate) exits 2 at once with an error naming
// the cause; with the right ones it serves, and `submit` with the same
// options calls it.
func TestNATSAuthAndTLS(t *testing.T) {
	const user, password = "pyfleet", "s3cret-Pw"
	auth := "authorization {\n  user: \"" + user + "\"\n  password: \"" + password + "\"\n}\n"

	// exits2 starts a node that must fail to connect and checks its exit
	// status and that its log names the cause (any of want, lower case).
	exits2 := func(t *testing.T, url string, flags []string, want ...string) {
		t.Helper()
		n := launchNode(t, nodeOptions{app: jobsApp(), workers: 1, extra: append([]string{"--nats", url}, flags...)})
		if code := n.wait(60 * time.Second); code != 2 {
			t.Fatalf("exit %d, want 2\n%s", code, n.log())
		}
		log := strings.ToLower(n.log())
		for _, w := range want {
			if strings.Contains(log, w) {
				for _, line := range strings.Split(n.log(), "\n") {
					if strings.HasPrefix(line, "poolnode: ") {
						t.Logf("%s", line)
					}
				}
				return
			}
		}
		t.Errorf("log does not name the cause (%q):\n%s", want, n.log())
	}

	t.Run("user and password", func(t *testing.T) {
		srv := startNATSServer(t, natsServerSpec{name: "auth", config: auth,
			clientOpts: []nats.Option{nats.UserInfo(user, password)}})
		srv.waitReady(30*time.Second, false)
		url := srv.url()

		t.Run("wrong password exits 2", func(t *testing.T) {
			exits2(t, url, []string{"--nats-user", user, "--nats-password", "wrong"}, "authorization violation")
		})
		t.Run("no credentials exits 2", func(t *testing.T) {
			exits2(t, url, nil, "authorization violation")
		})
		t.Run("right credentials serve", func(t *testing.T) {
			creds := []string{"--nats-user", user, "--nats-password", password}
			startNode(t, nodeOptions{app: jobsApp(), workers: 1, extra: append([]string{"--nats", url}, creds...)})
			out, errOut, code := runSubmit(t, url, "", append(append([]string{"call"}, creds...), "echo", `{"hi":1}`)...)
			if code != 0 || out != "{\"hi\":1}\n" {
				t.Errorf("submit call echo: exit %d, stdout %q, stderr %q", code, out, errOut)
			}
			out, errOut, code = runSubmit(t, url, "", "call", "--nats-user", user, "--nats-password", "wrong", "echo", `{}`)
			if code != 3 || !strings.Contains(strings.ToLower(errOut), "authorization violation") {
				t.Errorf("submit with a wrong password: exit %d, stdout %q, stderr %q; want 3 naming the authorization violation", code, out, errOut)
			}
		})
	})

	t.Run("TLS with client certificates", func(t *testing.T) {
		pki := testkit.NewPKI(t, t.TempDir())
		tlsConf := "tls {\n  cert_file: \"" + pki.ServerCert + "\"\n  key_file: \"" + pki.ServerKey + "\"\n  ca_file: \"" + pki.CA +
			"\"\n  verify: true\n  timeout: 2\n}\n"
		srv := startNATSServer(t, natsServerSpec{name: "tls", config: auth + tlsConf, tls: true,
			clientOpts: []nats.Option{nats.UserInfo(user, password), nats.RootCAs(pki.CA), nats.ClientCert(pki.ClientCert, pki.ClientKey)}})
		srv.waitReady(30*time.Second, false)
		url := srv.url()
		creds := []string{"--nats-user", user, "--nats-password", password}
		tlsFlags := []string{"--nats-tls-ca", pki.CA, "--nats-tls-cert", pki.ClientCert, "--nats-tls-key", pki.ClientKey}

		t.Run("unknown server CA exits 2", func(t *testing.T) {
			exits2(t, url, append(append([]string{}, creds...), "--nats-tls-cert", pki.ClientCert, "--nats-tls-key", pki.ClientKey),
				"certificate signed by unknown authority", "x509")
		})
		t.Run("no client certificate exits 2", func(t *testing.T) {
			exits2(t, url, append(append([]string{}, creds...), "--nats-tls-ca", pki.CA),
				"certificate required", "bad certificate", "tls error")
		})
		t.Run("wrong password exits 2", func(t *testing.T) {
			exits2(t, url, append([]string{"--nats-user", user, "--nats-password", "wrong"}, tlsFlags...), "authorization violation")
		})
		t.Run("right credentials serve", func(t *testing.T) {
			startNode(t, nodeOptions{app: jobsApp(), workers: 1, extra: append(append([]string{"--nats", url}, creds...), tlsFlags...)})
			args := append(append([]string{"call"}, creds...), tlsFlags...)
			out, errOut, code := runSubmit(t, url, "", append(args, "echo", `{"hi":1}`)...)
			if code != 0 || out != "{\"hi\":1}\n" {
				t.Errorf("submit call echo over TLS: exit %d, stdout %q, stderr %q", code, out, errOut)
			}
			// Jobs go through JetStream on the same connection.
			args = append(append([]string{"job", "--wait", "--timeout", "60s"}, creds...), tlsFlags...)
			out, errOut, code = runSubmit(t, url, "", append(args, "work", `{"id":"tls"}`)...)
			if code != 0 || out != "{\"id\":\"tls\"}\n" {
				t.Errorf("submit job --wait over TLS: exit %d, stdout %q, stderr %q", code, out, errOut)
			}
		})
	})
}
