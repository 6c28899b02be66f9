package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"iter"
	"sort"
	"strings"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/client"
	"github.com/pyfleet/pyfleet/protocol"
)

// checkToken rejects a value that would not be exactly one subject token:
// a dot would silently address another subject, a wildcard many. The rule
// is the node's (protocol.ValidToken), so what passes here is not refused
// there; checking it here names the flag.
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

// output prints answers the way call and job --wait show them.
type output struct {
	stdout  io.Writer
	stderr  io.Writer
	headers bool // --headers: reply headers on stderr
	raw     bool // bytes as they are: no added newline
}

// show prints an answer as it comes: each item of a stream on a line of its
// own, or the one result; with --headers, the headers of the first item
// and of the answer's last message (the result, the stream's end or the
// error), which trailer holds once seq is done.
func (o *output) show(seq iter.Seq2[*client.Msg, error], trailer *nats.Header) error {
	chunks, whole := 0, false
	for m, err := range seq {
		if err != nil {
			if o.headers && *trailer != nil {
				printHeaders(o.stderr, *trailer)
			}
			return err
		}
		switch {
		case !m.Chunk():
			whole = true
			if o.headers {
				printHeaders(o.stderr, m.Header)
			}
		case chunks == 0 && o.headers:
			printHeaders(o.stderr, m.Header)
		}
		if m.Chunk() {
			chunks++
		}
		if err := o.print(m.Data); err != nil {
			return err
		}
	}
	if o.headers && !whole && *trailer != nil {
		printHeaders(o.stderr, *trailer)
	}
	return nil
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
