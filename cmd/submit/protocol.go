package main

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/protocol"
)

// checkToken rejects a value that would not be exactly one subject token:
// a dot would silently address another subject, a wildcard many. The rule
// is the node's (protocol.ValidToken), so what passes here is not refused
// there.
func checkToken(what, v string) error {
	if v == "" {
		return usagef("%s must not be empty", what)
	}
	var ne *protocol.NameError
	if err := protocol.ValidToken(v); errors.As(err, &ne) {
		return usagef("%s %q must be one subject token: %s", what, v, ne.Reason)
	}
	return nil
}

func checkPrefix(p string) error {
	var ne *protocol.NameError
	if err := protocol.ValidPrefix(p); errors.As(err, &ne) {
		return usagef("--prefix %q is not a subject prefix: %v", p, ne)
	}
	return nil
}

func isChunk(h nats.Header) bool {
	return protocol.Header(h, protocol.HeaderStream) == protocol.StreamChunk
}

func isHeartbeat(h nats.Header) bool {
	return protocol.Header(h, protocol.HeaderStream) == protocol.StreamHeartbeat
}

// isNoResponders recognises the server's answer to a request nobody listens
// to: a status 503 with no body, never a node's 503, which has a body.
func isNoResponders(m *nats.Msg) bool {
	return len(m.Data) == 0 && m.Header.Get("Status") == "503"
}

// output prints replies the way call and job --wait show them.
type output struct {
	stdout  io.Writer
	stderr  io.Writer
	headers bool // --headers: reply headers on stderr
	raw     bool // bytes as they are: no added newline
	chunks  int
}

// handle prints one message of an answer and reports whether it was the
// last: anything but a chunk ends the answer.
func (o *output) handle(h nats.Header, data []byte) (done bool, err error) {
	if isChunk(h) {
		if o.chunks == 0 && o.headers {
			printHeaders(o.stderr, h)
		}
		o.chunks++
		return false, o.print(data)
	}
	if o.headers {
		printHeaders(o.stderr, h)
	}
	if e := protocol.ReplyError(h, data); e != nil {
		return true, e
	}
	if o.chunks > 0 || protocol.Header(h, protocol.HeaderStream) == protocol.StreamEnd {
		// The end of a stream carries headers, not a value.
		return true, nil
	}
	return true, o.print(data)
}

func (o *output) print(data []byte) error {
	if o.raw {
		_, err := o.stdout.Write(data)
		return err
	}
	// One write per line keeps lines whole when stdout is a shared pipe.
	line := make([]byte, 0, len(data)+1)
	line = append(append(line, data...), '\n')
	_, err := o.stdout.Write(line)
	return err
}

func printHeaders(w io.Writer, h nats.Header) {
	keys := make([]string, 0, len(h))
	for k := range h {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		for _, v := range h[k] {
			fmt.Fprintf(&b, "%s: %s\n", k, v)
		}
	}
	io.WriteString(w, b.String())
}

// payload turns the optional argument into the request body: none is null,
// "-" is stdin. JSON is checked here, so a typo costs no round trip and gets
// a precise message rather than a node's 400.
func payload(args []string, stdin io.Reader, raw bool) ([]byte, error) {
	var data []byte
	switch {
	case len(args) == 0:
		if raw {
			return nil, nil
		}
		return []byte("null"), nil
	case args[0] == "-":
		b, err := io.ReadAll(stdin)
		if err != nil {
			return nil, fmt.Errorf("reading stdin: %w", err)
		}
		data = b
	default:
		data = []byte(args[0])
	}
	if raw {
		return data, nil
	}
	data = bytes.TrimSpace(data)
	if len(data) == 0 {
		return nil, usagef("empty JSON argument (pass null for no value)")
	}
	var v any
	if err := json.Unmarshal(data, &v); err != nil {
		msg := fmt.Sprintf("argument is not valid JSON: %v", err)
		switch {
		case len(args) == 0 || args[0] == "-":
		case strings.HasPrefix(args[0], "-"):
			msg += "; flags go before FUNCTION"
		case !strings.ContainsAny(args[0], `"{[`):
			msg += fmt.Sprintf(` (a string needs quotes: '"%s"')`, args[0])
		}
		return nil, usagef("%s", msg)
	}
	return data, nil
}

// functionArgs splits FUNCTION [JSON|-] and checks their number.
func functionArgs(args []string) (fn string, rest []string, err error) {
	if len(args) == 0 {
		return "", nil, usagef("missing FUNCTION")
	}
	if len(args) > 2 {
		if strings.HasPrefix(args[2], "-") {
			return "", nil, usagef("unexpected %q: flags go before FUNCTION", args[2])
		}
		return "", nil, usagef("too many arguments: want FUNCTION [JSON|-]; quote the JSON")
	}
	if err := checkToken("FUNCTION", args[0]); err != nil {
		return "", nil, err
	}
	return args[0], args[1:], nil
}

func noArgs(args []string) error {
	if len(args) > 0 {
		if strings.HasPrefix(args[0], "-") {
			return usagef("unexpected %q", args[0])
		}
		return usagef("unexpected argument %q", args[0])
	}
	return nil
}

// millis renders a duration for Pyfleet-Timeout, rounding up so a short
// timeout never becomes 0, which would mean "none".
func millis(d time.Duration) string {
	return strconv.FormatInt(int64((d+time.Millisecond-1)/time.Millisecond), 10)
}

// replyMargin is how long past the deadline the client still waits, so the
// node's own 408, which says more than a client-side timeout, gets through.
func replyMargin(timeout time.Duration) time.Duration {
	return min(max(timeout/10, 500*time.Millisecond), 5*time.Second)
}

func randomID() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
