package main

import (
	"cmp"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/client"
)

const defaultNATSURL = "nats://127.0.0.1:4222"

// connOptions are the NATS client options every command accepts, the same
// set poolnode takes (README.md, "poolnode").
type connOptions struct {
	url      string
	creds    string
	user     string
	password string
	token    string
	tlsCA    string
	tlsCert  string
	tlsKey   string
}

// secretFlags never show their value, not even a default taken from the
// environment, in usage text.
var secretFlags = map[string]bool{"nats-password": true, "nats-token": true}

// fromEnv takes defaults from the variables the nats CLI reads, so a shell
// set up for `nats` works for submit and secrets can stay off the command line.
func (o *connOptions) fromEnv(getenv func(string) string) {
	o.url = cmp.Or(getenv("NATS_URL"), defaultNATSURL)
	o.creds = getenv("NATS_CREDS")
	o.user = getenv("NATS_USER")
	o.password = getenv("NATS_PASSWORD")
	o.token = getenv("NATS_TOKEN")
	o.tlsCA = getenv("NATS_CA")
	o.tlsCert = getenv("NATS_CERT")
	o.tlsKey = getenv("NATS_KEY")
}

func (o *connOptions) register(fs *flag.FlagSet) {
	fs.StringVar(&o.url, "nats", o.url, "NATS server `URL`s, comma-separated (env NATS_URL)")
	fs.StringVar(&o.creds, "nats-creds", o.creds, "credentials `FILE` (env NATS_CREDS)")
	fs.StringVar(&o.user, "nats-user", o.user, "`USER` name (env NATS_USER)")
	fs.StringVar(&o.password, "nats-password", o.password, "`PASSWORD` (env NATS_PASSWORD)")
	fs.StringVar(&o.token, "nats-token", o.token, "authentication `TOKEN` (env NATS_TOKEN)")
	fs.StringVar(&o.tlsCA, "nats-tls-ca", o.tlsCA, "CA certificate `FILE` to verify the server (env NATS_CA)")
	fs.StringVar(&o.tlsCert, "nats-tls-cert", o.tlsCert, "client certificate `FILE` (env NATS_CERT)")
	fs.StringVar(&o.tlsKey, "nats-tls-key", o.tlsKey, "client key `FILE` (env NATS_KEY)")
}

// validate catches option mistakes before dialling, where they would
// otherwise surface as a vaguer connection error.
func (o *connOptions) validate() error {
	if strings.TrimSpace(o.url) == "" {
		return usagef("--nats: no server URL")
	}
	if o.password != "" && o.user == "" {
		return usagef("--nats-password needs --nats-user")
	}
	if (o.tlsCert == "") != (o.tlsKey == "") {
		return usagef("--nats-tls-cert and --nats-tls-key go together")
	}
	for _, f := range []struct{ flag, path string }{
		{"--nats-creds", o.creds}, {"--nats-tls-ca", o.tlsCA},
		{"--nats-tls-cert", o.tlsCert}, {"--nats-tls-key", o.tlsKey},
	} {
		if f.path == "" {
			continue
		}
		if _, err := os.Stat(f.path); err != nil {
			return usagef("%s: %v", f.flag, err)
		}
	}
	return nil
}

// connect dials NATS and returns a client of the fleet under --prefix.
// Failing to reach NATS is exit 3: no node can answer.
func (a *app) connect(o client.Options) (*client.Client, error) {
	c := &a.conn
	opts := []nats.Option{
		nats.Name("pyfleet submit"),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			if sub != nil {
				fmt.Fprintf(a.stderr, "submit: nats: %s: %v\n", sub.Subject, err)
				return
			}
			fmt.Fprintf(a.stderr, "submit: nats: %v\n", err)
		}),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				fmt.Fprintf(a.stderr, "submit: disconnected from NATS (%v), reconnecting\n", err)
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			fmt.Fprintf(a.stderr, "submit: reconnected to NATS at %s\n", redactURLs(nc.ConnectedUrl()))
		}),
	}
	if c.creds != "" {
		opts = append(opts, nats.UserCredentials(c.creds))
	}
	if c.user != "" {
		opts = append(opts, nats.UserInfo(c.user, c.password))
	}
	if c.token != "" {
		opts = append(opts, nats.Token(c.token))
	}
	if c.tlsCA != "" {
		opts = append(opts, nats.RootCAs(c.tlsCA))
	}
	if c.tlsCert != "" {
		opts = append(opts, nats.ClientCert(c.tlsCert, c.tlsKey))
	}
	o.Prefix = a.prefix
	o.NATS = opts
	cl, err := client.Connect(c.url, o)
	if err != nil {
		return nil, &exitError{code: exitUnavailable, err: err}
	}
	return cl, nil
}

// redactURLs hides passwords and tokens embedded in server URLs before they
// are printed.
func redactURLs(list string) string { return client.RedactURLs(list) }

// isClosed reports whether err means the connection is gone for good.
func isClosed(err error) bool {
	return errors.Is(err, nats.ErrConnectionClosed) || errors.Is(err, nats.ErrConnectionDraining)
}
