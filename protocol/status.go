package protocol

import (
	"encoding/base64"
	"encoding/json"
	"regexp"
	"strings"
	"time"
)

// The states of a job (JobStatus.State). docs/protocol.md ("Job status")
// says who writes each.
const (
	JobPending   = "pending"   // submitted, not yet taken by a node
	JobScheduled = "scheduled" // submitted to run later
	JobRunning   = "running"   // a node runs it
	JobRetrying  = "retrying"  // a delivery failed; the job will be delivered again
	JobDone      = "done"      // its ok result is stored
	JobFailed    = "failed"    // it failed in a way that can never succeed (400, 404, 413, ...): dead-lettered at once
	JobDead      = "dead"      // it failed its last delivery: dead-lettered
	JobCancelled = "cancelled" // cancelled before it finished
)

// JobStates lists the states in the order a job may pass them.
var JobStates = []string{JobPending, JobScheduled, JobRunning, JobRetrying, JobDone, JobFailed, JobDead, JobCancelled}

// FinalState reports whether a job in state will change no more (short of
// being submitted again).
func FinalState(state string) bool {
	switch state {
	case JobDone, JobFailed, JobDead, JobCancelled:
		return true
	}
	return false
}

// JobStatus is the value of a job's key in the status bucket (StatusBucket),
// JSON.
type JobStatus struct {
	ID       string `json:"id"`
	Pool     string `json:"pool"`
	Function string `json:"function,omitempty"`
	// Seq is the job's sequence in the jobs stream. It orders the
	// submissions of one id: a writer never replaces the status of a
	// later submission with one of an earlier.
	Seq   uint64 `json:"seq,omitempty"`
	State string `json:"state"`
	// Attempts is how many deliveries of the job started (1 for the first).
	Attempts  uint64    `json:"attempts"`
	Node      string    `json:"node,omitempty"`
	Worker    string    `json:"worker,omitempty"`
	Submitted time.Time `json:"submitted,omitzero"`
	Started   time.Time `json:"started,omitzero"`  // of the last delivery
	Finished  time.Time `json:"finished,omitzero"` // once the state is final
	Updated   time.Time `json:"updated"`
	// Error is the last error: of the last failed delivery, or the final one.
	Error *ErrorDetail `json:"error,omitempty"`
	// Progress is the last progress value the function reported, any JSON.
	Progress json.RawMessage `json:"progress,omitempty"`
}

// StatusBucket names the key-value bucket of the jobs' status under prefix
// ("" means DefaultPrefix): PYFLEET_STATUS, or <PREFIX>_STATUS with the
// prefix's dots as "_", beside the streams' names (bus.Streams).
func StatusBucket(prefix string) string {
	base := "PYFLEET"
	if prefix != "" && prefix != DefaultPrefix {
		base = strings.ToUpper(nameBad.ReplaceAllString(prefix, "_"))
	}
	return base + "_STATUS"
}

var nameBad = regexp.MustCompile(`[^A-Za-z0-9_-]`)

// keyPlain is what a pool or job id may hold to appear in a key as it is.
// Key-value keys allow fewer characters than a subject token; anything else
// is written as "=" and its unpadded URL-safe base64, and since a plain
// part never holds "=", no two names share a key.
var keyPlain = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)

// StatusKey is the key of job id of pool in the status bucket: <pool>.<id>,
// each part as it is when it holds only letters, digits, "_" and "-", else
// "=" and its base64url.
func StatusKey(pool, id string) string {
	return keyPart(pool) + "." + keyPart(id)
}

func keyPart(s string) string {
	if keyPlain.MatchString(s) {
		return s
	}
	return "=" + base64.RawURLEncoding.EncodeToString([]byte(s))
}
