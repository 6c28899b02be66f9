package protocol

import (
	"errors"
	"fmt"
	"strings"
	"unicode"
)

// DefaultPrefix is the first token of every pyfleet subject.
const DefaultPrefix = "pyfleet"

// Subjects builds the subjects of one prefix. The zero value uses
// DefaultPrefix.
type Subjects struct {
	Prefix string
}

// Root is the prefix in use: Prefix, or DefaultPrefix when it is empty.
func (s Subjects) Root() string {
	if s.Prefix == "" {
		return DefaultPrefix
	}
	return s.Prefix
}

// Request is where callers send calls of function in pool.
func (s Subjects) Request(pool, function string) string {
	return s.Root() + ".req." + pool + "." + function
}

// Node is where callers send calls that must reach one node, to keep a
// session there.
func (s Subjects) Node(node, pool, function string) string {
	return s.Root() + ".node." + node + "." + pool + "." + function
}

// Job is where jobs for function in pool are submitted.
func (s Subjects) Job(pool, function string) string {
	return s.Root() + ".job." + pool + "." + function
}

// Result is where the result of job id is stored.
func (s Subjects) Result(pool, id string) string {
	return s.Root() + ".result." + pool + "." + id
}

// Dead is where jobs of function that will never succeed end up.
func (s Subjects) Dead(pool, function string) string {
	return s.Root() + ".dead." + pool + "." + function
}

// CancelJob is where a client that cancelled job id of pool (its status
// says so) tells the node running it to stop it.
func (s Subjects) CancelJob(pool, id string) string {
	return s.Root() + ".cancel.job." + pool + "." + id
}

// Event is where lifecycle events of kind on node are published.
func (s Subjects) Event(pool, node, kind string) string {
	return s.Root() + ".evt." + pool + "." + node + "." + kind
}

// CancelCall is where a caller that gave up on a call publishes the call's
// reply subject (the body, nothing else): every node of pool listens, and
// the one running the call stops it.
func (s Subjects) CancelCall(pool string) string {
	return s.Root() + ".cancel.call." + pool
}

// Progress is where the node publishes each ctx.progress value of job id
// of pool while the job runs.
func (s Subjects) Progress(pool, id string) string {
	return s.Root() + ".progress." + pool + "." + id
}

// ErrInvalidName is what every error of ValidToken and ValidPrefix is
// (errors.Is).
var ErrInvalidName = errors.New("invalid name")

// NameError is the error of ValidToken and ValidPrefix: Name is the value
// refused ("" when it was empty) and Reason what is wrong with it, for a
// caller that words its own message.
type NameError struct {
	Name, Reason string
}

func (e *NameError) Error() string {
	if e.Name == "" {
		return ErrInvalidName.Error() + ": " + e.Reason
	}
	return fmt.Sprintf("%v %q: %s", ErrInvalidName, e.Name, e.Reason)
}

// Is makes every NameError match ErrInvalidName.
func (e *NameError) Is(target error) bool { return target == ErrInvalidName }

// ValidToken reports whether s can be one token of a NATS subject, as pool,
// node, function names and job ids must be: a name with a dot would
// silently shift every later token of the subject, and a wildcard would
// subscribe to more than asked for. The error is a *NameError.
func ValidToken(s string) error {
	if s == "" {
		return &NameError{Reason: "empty"}
	}
	for _, r := range s {
		switch {
		case r == '.':
			return &NameError{s, "must not contain '.'"}
		case r == '*' || r == '>':
			return &NameError{s, fmt.Sprintf("must not contain the wildcard %q", r)}
		case unicode.IsSpace(r):
			return &NameError{s, "must not contain white space"}
		case unicode.IsControl(r) || r == unicode.ReplacementChar:
			return &NameError{s, "must not contain control or invalid characters"}
		}
	}
	return nil
}

// ValidPrefix reports whether p can start pyfleet subjects: one or more valid
// tokens joined by dots, such as "pyfleet" or "acme.pyfleet". The error
// wraps the *NameError of the first bad token.
func ValidPrefix(p string) error {
	if p == "" {
		return &NameError{Reason: "empty subject prefix"}
	}
	for _, tok := range strings.Split(p, ".") {
		if err := ValidToken(tok); err != nil {
			return fmt.Errorf("subject prefix %q: %w", p, err)
		}
	}
	return nil
}

// Status is where node answers requests for its detail (workers,
// per-function figures; docs/protocol.md, "Node status").
func (s Subjects) Status(pool, node string) string {
	return s.Root() + ".status." + pool + "." + node
}

// StatusAll is where every node answers the same requests as on Status: a
// client asks the whole fleet at once and gathers the answers until its
// wait ends (NATS cannot publish to a wildcard).
func (s Subjects) StatusAll() string {
	return s.Root() + ".status"
}

// Control is where node takes the operator's requests of verb (ControlRecycle,
// ControlDrain, ControlReload); docs/protocol.md, "Node control".
func (s Subjects) Control(pool, node, verb string) string {
	return s.Root() + ".ctl." + pool + "." + node + "." + verb
}

// Verbs of Control.
const (
	// ControlRecycle replaces the worker the body names, as --max-requests
	// would: no call fails.
	ControlRecycle = "recycle"
	// ControlDrain stops the node as SIGTERM does: no new work, the accepted
	// work gets the shutdown grace, then the node exits.
	ControlDrain = "drain"
	// ControlReload reloads the app as SIGHUP does: a new template under
	// --preload, then a rolling recycle, each replacement serving before the
	// worker it replaces stops. The answer comes once the reload is done.
	ControlReload = "reload"
)
