package protocol

import (
	"fmt"
	"strings"
)

// The priorities of a job. docs/protocol.md ("Priorities") is the rule: a
// node fetches every high job it can before any normal one, and every
// normal one before any low one.
const (
	PriorityHigh   = "high"
	PriorityNormal = "normal"
	PriorityLow    = "low"
)

// Priorities lists the priorities in the order nodes fetch them.
var Priorities = []string{PriorityHigh, PriorityNormal, PriorityLow}

// ValidPriority reports whether p names a priority; "" is normal.
func ValidPriority(p string) error {
	switch p {
	case "", PriorityHigh, PriorityNormal, PriorityLow:
		return nil
	}
	return fmt.Errorf("priority %q: want %q, %q or %q", p, PriorityHigh, PriorityNormal, PriorityLow)
}

// JobPriority is where jobs of function in pool with priority p are
// submitted: Job(pool, function) for normal (and ""), so that a job sent
// without a priority is a normal one, and that subject with the priority
// as one more token otherwise. Each level has its own subject so that each
// can have its own consumer: a work queue stream delivers in stream order
// within a consumer, whatever the headers say.
func (s Subjects) JobPriority(pool, function, p string) string {
	if p == "" || p == PriorityNormal {
		return s.Job(pool, function)
	}
	return s.Job(pool, function) + "." + p
}

// SplitJobFunction splits what follows <prefix>.job.<pool>. in a job's
// subject into the function and the priority ("normal" without a priority
// token); a rest that is no function and priority is returned whole as
// the function, for the node to refuse by name.
func SplitJobFunction(rest string) (function, priority string) {
	fn, p, ok := strings.Cut(rest, ".")
	if !ok {
		return rest, PriorityNormal
	}
	if (p == PriorityHigh || p == PriorityLow) && ValidToken(fn) == nil {
		return fn, p
	}
	return rest, PriorityNormal
}
