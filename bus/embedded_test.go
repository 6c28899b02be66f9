package bus_test

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap/zaptest"

	"github.com/pyfleet/pyfleet/bus"
)

func TestStartEmbeddedRandomPort(t *testing.T) {
	srv := MustServer(t)
	if strings.HasSuffix(srv.ClientURL(), ":4222") || strings.HasSuffix(srv.ClientURL(), ":-1") {
		t.Errorf("ClientURL = %s, want a random port", srv.ClientURL())
	}
	if !srv.JetStreamEnabled() {
		t.Error("JetStream off")
	}
}

func TestStartEmbeddedPortInUse(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	addr := l.Addr().String()
	_, err = bus.StartEmbedded(bus.EmbeddedConfig{Listen: addr, StoreDir: t.TempDir()}, zaptest.NewLogger(t))
	if err == nil || !strings.Contains(err.Error(), addr) || !strings.Contains(err.Error(), "address already in use") {
		t.Errorf("StartEmbedded on a busy port: %v", err)
	}
}

func TestStartEmbeddedBadConfig(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	readOnly := filepath.Join(t.TempDir(), "ro")
	if err := os.Mkdir(readOnly, 0o500); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		cfg  bus.EmbeddedConfig
		want string
	}{
		{bus.EmbeddedConfig{Listen: "127.0.0.1:0", StoreDir: filepath.Join(file, "js")}, file},
		{bus.EmbeddedConfig{Listen: "127.0.0.1:0"}, "store dir is not set"},
		{bus.EmbeddedConfig{Listen: "127.0.0.1", StoreDir: t.TempDir()}, `"127.0.0.1"`},
		{bus.EmbeddedConfig{Listen: "127.0.0.1:http", StoreDir: t.TempDir()}, `"http"`},
		{bus.EmbeddedConfig{Listen: ":0", StoreDir: t.TempDir()}, "host is empty"},
		{bus.EmbeddedConfig{Listen: "127.0.0.1:0", StoreDir: t.TempDir(), TLSCert: "/nonexistent.pem", TLSKey: "/nonexistent.key"}, "/nonexistent.pem"},
	}
	if os.Geteuid() != 0 { // root writes anywhere
		cases = append(cases, struct {
			cfg  bus.EmbeddedConfig
			want string
		}{bus.EmbeddedConfig{Listen: "127.0.0.1:0", StoreDir: readOnly}, "not writable"})
	}
	for _, c := range cases {
		_, err := bus.StartEmbedded(c.cfg, zaptest.NewLogger(t))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("StartEmbedded(%+v) = %v, want an error naming %s", c.cfg, err, c.want)
		}
	}
}

func TestConnectErrors(t *testing.T) {
	srv, err := bus.StartEmbedded(bus.EmbeddedConfig{Listen: "127.0.0.1:0", StoreDir: t.TempDir(), User: "u", Password: "secret"}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Shutdown(); srv.WaitForShutdown() })

	_, err = bus.Connect(bus.ConnConfig{URLs: srv.ClientURL(), User: "u", Password: "wrong"}, zaptest.NewLogger(t))
	if err == nil || !strings.Contains(err.Error(), "authorization violation") {
		t.Errorf("wrong password: %v", err)
	}
	nc, err := bus.Connect(bus.ConnConfig{URLs: srv.ClientURL(), User: "u", Password: "secret"}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatalf("right password: %v", err)
	}
	nc.Close()

	// A port nobody listens on: refused at once, not after a timeout.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	free := l.Addr().String()
	l.Close()
	_, err = bus.Connect(bus.ConnConfig{URLs: "nats://user:pw@" + free}, zaptest.NewLogger(t))
	if err == nil || !strings.Contains(err.Error(), "connection refused") || !strings.Contains(err.Error(), free) {
		t.Errorf("nothing listening: %v", err)
	}
	if strings.Contains(err.Error(), "pw") {
		t.Errorf("password in error: %v", err)
	}
	_, err = bus.Connect(bus.ConnConfig{URLs: srv.ClientURL(), TLSCert: "c.pem"}, nil)
	if err == nil || !strings.Contains(err.Error(), "key") {
		t.Errorf("cert without key: %v", err)
	}
}

func TestEmbeddedToken(t *testing.T) {
	srv, err := bus.StartEmbedded(bus.EmbeddedConfig{Listen: "127.0.0.1:0", StoreDir: t.TempDir(), Token: "tok"}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Shutdown(); srv.WaitForShutdown() })
	if _, err := bus.Connect(bus.ConnConfig{URLs: srv.ClientURL()}, nil); err == nil || !strings.Contains(err.Error(), "authorization violation") {
		t.Errorf("no token: %v", err)
	}
	nc, err := bus.Connect(bus.ConnConfig{URLs: srv.ClientURL(), Token: "tok"}, nil)
	if err != nil {
		t.Fatalf("token: %v", err)
	}
	nc.Close()
}
