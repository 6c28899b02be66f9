package pool

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/pyfleet/pyfleet/lifecycle"
)

// The worker's first words on stdout: one of these, then a JSON object.
const (
	handshakeReady = "PYFLEET-READY "
	handshakeError = "PYFLEET-ERROR "
)

// handshakeVersion is the worker protocol this node speaks, the "v" of
// the handshake: 2 since a worker opens its stream with an empty batch
// (pool/worker.go, awaitGreeting), which a worker of v1 never sends.
const handshakeVersion = 2

// handshake is the JSON a worker prints once it serves.
type handshake struct {
	Version   int `json:"v"`
	PID       int `json:"pid"`
	Functions []struct {
		Name   string `json:"name"`
		Raw    bool   `json:"raw"`
		Stream bool   `json:"stream"`
		// Inline says the worker runs the function on its event loop,
		// which answers nothing else (health checks included) meanwhile.
		Inline bool `json:"inline"`
		// The JSON Schemas of what the function takes and returns
		// (python/pyfleet/typed.py); absent for raw functions.
		InputSchema  json.RawMessage `json:"input_schema,omitempty"`
		OutputSchema json.RawMessage `json:"output_schema,omitempty"`
		// RateLimit is @app.function(rate_limit=...), "" for none.
		RateLimit string `json:"rate_limit,omitempty"`
	} `json:"functions"`
}

// AppError is a worker that could not load the app: restarting cannot help,
// so the node reports it and exits.
type AppError struct {
	Type    string `json:"type"`
	Message string `json:"message"`
}

func (e *AppError) Error() string {
	return fmt.Sprintf("the app failed to load: %s: %s", e.Type, e.Message)
}

// RuntimeError is a worker whose pyfleet runtime speaks another version of
// the worker protocol than this node: an interpreter with another
// release's pyfleet installed. Restarting cannot help, so the node reports
// it and exits.
type RuntimeError struct {
	Worker  string
	Version int // the worker's; 0 when it said none
}

func (e *RuntimeError) Error() string {
	return fmt.Sprintf("worker %s: its pyfleet runtime speaks worker protocol v%d, this node v%d: "+
		"install the python/ directory of this node's release into the interpreter", e.Worker, e.Version, handshakeVersion)
}

// fatalStartError reports whether a worker's failed start says that no
// start of the same app with the same interpreter can succeed.
func fatalStartError(err error) bool {
	var appErr *AppError
	var rtErr *RuntimeError
	return errors.As(err, &appErr) || errors.As(err, &rtErr)
}

// handshakeReader reads a starting worker's output: its stdout and stderr
// callbacks run on the process's two reader goroutines, and wait, on the
// spawning goroutine, takes the outcome. Output that is not a handshake line
// is logged; the last lines of stderr say why a worker died before its
// handshake.
type handshakeReader struct {
	name   string
	log    *zap.Logger
	result chan handshakeResult // buffered: the first handshake line only
	tail   tail
}

type handshakeResult struct {
	hs  *handshake
	err error
}

func newHandshakeReader(name string, log *zap.Logger) *handshakeReader {
	return &handshakeReader{name: name, log: log, result: make(chan handshakeResult, 1)}
}

// stdout is lifecycle.StartOptions.Stdout.
func (r *handshakeReader) stdout(line []byte) {
	res, ok := parseHandshake(r.name, line)
	if !ok {
		r.log.Info(string(line), zap.String("stream", "stdout"))
		return
	}
	select {
	case r.result <- res:
	default: // a second handshake line is garbage; the first one counts
		r.log.Warn("unexpected handshake line", zap.ByteString("line", line))
	}
}

// stderr is lifecycle.StartOptions.Stderr.
func (r *handshakeReader) stderr(line []byte) {
	r.tail.add(line)
	r.log.Info(string(line), zap.String("stream", "stderr"))
}

// parseHandshake reads one line of a worker's stdout; ok is false when it
// is not a handshake line at all.
func parseHandshake(name string, line []byte) (res handshakeResult, ok bool) {
	switch {
	case bytes.HasPrefix(line, []byte(handshakeReady)):
		var hs handshake
		if err := json.Unmarshal(line[len(handshakeReady):], &hs); err != nil {
			res.err = fmt.Errorf("worker %s: bad handshake %q: %w", name, line, err)
		} else if hs.Version != handshakeVersion {
			res.err = &RuntimeError{Worker: name, Version: hs.Version}
		} else {
			res.hs = &hs
		}
	case bytes.HasPrefix(line, []byte(handshakeError)):
		var ae AppError
		if err := json.Unmarshal(line[len(handshakeError):], &ae); err != nil {
			res.err = fmt.Errorf("worker %s: bad error line %q: %w", name, line, err)
		} else {
			res.err = &ae
		}
	default:
		return res, false
	}
	return res, true
}

// wait returns the worker's handshake, or why there is none: an *AppError,
// a bad line, the process's exit, or ctx's end (the start timeout, limit).
func (r *handshakeReader) wait(ctx context.Context, proc *lifecycle.Process, limit time.Duration) (*handshake, error) {
	select {
	case res := <-r.result:
		return res.hs, res.err
	case <-proc.Done():
		// Done closes only after the output readers have passed on every
		// line, so an error line the worker printed before exiting is here.
		select {
		case res := <-r.result:
			if res.err != nil {
				return nil, res.err
			}
		default:
		}
		return nil, fmt.Errorf("worker %s exited before its handshake (%s): %s", r.name, proc.Exit(), r.tail.String())
	case <-ctx.Done():
		return nil, fmt.Errorf("worker %s sent no handshake within %s", r.name, limit)
	}
}

// tail keeps the last lines of a worker's stderr, to say why it died before
// its handshake.
type tail struct {
	mu    sync.Mutex
	lines []string
}

func (t *tail) add(line []byte) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.lines = append(t.lines, string(line))
	if len(t.lines) > 8 {
		t.lines = t.lines[1:]
	}
}

func (t *tail) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.lines) == 0 {
		return "no output on stderr"
	}
	var b bytes.Buffer
	for i, l := range t.lines {
		if i > 0 {
			b.WriteString(" | ")
		}
		b.WriteString(l)
	}
	return b.String()
}
