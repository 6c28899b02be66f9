package bus

import (
	"errors"
	"fmt"
	"strings"
	"unicode"
)

// DefaultPrefix is the first token of every pyfleet subject.
const DefaultPrefix = "pyfleet"

// ErrInvalidName is wrapped by every error ValidToken and ValidPrefix return.
var ErrInvalidName = errors.New("invalid name")

// ValidToken reports whether s can be one token of a NATS subject, as pool,
// node and function names must be: a name with a dot would silently shift
// every later token of the subject, and a wildcard would subscribe to more
// than asked for.
func ValidToken(s string) error {
	if s == "" {
		return fmt.Errorf("%w: empty", ErrInvalidName)
	}
	for _, r := range s {
		switch {
		case r == '.':
			return fmt.Errorf("%w %q: must not contain '.'", ErrInvalidName, s)
		case r == '*' || r == '>':
			return fmt.Errorf("%w %q: must not contain the wildcard %q", ErrInvalidName, s, r)
		case unicode.IsSpace(r):
			return fmt.Errorf("%w %q: must not contain white space", ErrInvalidName, s)
		case unicode.IsControl(r) || r == unicode.ReplacementChar:
			return fmt.Errorf("%w %q: must not contain control or invalid characters", ErrInvalidName, s)
		}
	}
	return nil
}

// ValidPrefix reports whether p can start pyfleet subjects: one or more valid
// tokens joined by dots, such as "pyfleet" or "acme.pyfleet".
func ValidPrefix(p string) error {
	if p == "" {
		return fmt.Errorf("%w: empty subject prefix", ErrInvalidName)
	}
	for _, tok := range strings.Split(p, ".") {
		if err := ValidToken(tok); err != nil {
			return fmt.Errorf("subject prefix %q: %w", p, err)
		}
	}
	return nil
}

// Subjects builds the subjects of one prefix. The zero value uses
// DefaultPrefix.
type Subjects struct {
	Prefix string
}

func (s Subjects) prefix() string {
	if s.Prefix == "" {
		return DefaultPrefix
	}
	return s.Prefix
}

// Request is where callers send calls of function in pool.
func (s Subjects) Request(pool, function string) string {
	return s.prefix() + ".req." + pool + "." + function
}

// Node is where callers send calls that must reach one node, to keep a
// session there.
func (s Subjects) Node(node, pool, function string) string {
	return s.prefix() + ".node." + node + "." + pool + "." + function
}

// Job is where jobs for function in pool are submitted.
func (s Subjects) Job(pool, function string) string {
	return s.prefix() + ".job." + pool + "." + function
}

// Result is where the result of job id is stored.
func (s Subjects) Result(pool, id string) string {
	return s.prefix() + ".result." + pool + "." + id
}

// Dead is where jobs of function that will never succeed end up.
func (s Subjects) Dead(pool, function string) string {
	return s.prefix() + ".dead." + pool + "." + function
}

// Event is where lifecycle events of kind on node are published.
func (s Subjects) Event(pool, node, kind string) string {
	return s.prefix() + ".evt." + pool + "." + node + "." + kind
}

// lastToken returns what follows the last dot of subject.
func lastToken(subject string) string {
	return subject[strings.LastIndexByte(subject, '.')+1:]
}
