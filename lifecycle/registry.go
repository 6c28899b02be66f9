package lifecycle

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// States of a registry record.
const (
	// StateStarting: recorded before the spawn, so that a node that dies
	// mid-spawn still leaves a trace of the worker; no pid yet.
	StateStarting = "starting"
	// StateRunning: the process runs; its identity is recorded.
	StateRunning = "running"
	// StateStopping: the node is stopping it.
	StateStopping = "stopping"
)

// Record is what the registry knows about one worker of one run.
type Record struct {
	Node      string `json:"node"`
	Run       string `json:"run"`
	Worker    string `json:"worker"`
	Pool      string `json:"pool,omitempty"`
	PID       int    `json:"pid,omitempty"`
	PGID      int    `json:"pgid,omitempty"`
	StartTime uint64 `json:"start_time,omitempty"`
	BootID    string `json:"boot_id,omitempty"`
	State     string `json:"state"`
	// The node process that wrote the record (Put fills these in): while
	// it lives, so does the run, whatever happened to its lock file.
	NodePID       int    `json:"node_pid,omitempty"`
	NodeStartTime uint64 `json:"node_start_time,omitempty"`
	NodeBootID    string `json:"node_boot_id,omitempty"`
}

// Identity returns the identity of the recorded process.
func (r Record) Identity() Identity {
	return Identity{PID: r.PID, StartTime: r.StartTime, BootID: r.BootID}
}

// NodeIdentity returns the identity of the node process that wrote the
// record; zero for records of older versions, which did not say.
func (r Record) NodeIdentity() Identity {
	return Identity{PID: r.NodePID, StartTime: r.NodeStartTime, BootID: r.NodeBootID}
}

// SetProcess records p as the record's process.
func (r *Record) SetProcess(p *Process) {
	id := p.Identity()
	r.PID, r.PGID, r.StartTime, r.BootID = id.PID, p.PGID(), id.StartTime, id.BootID
}

func (r Record) key() []byte {
	// NUL cannot occur in a valid name, so the key splits back unambiguously.
	return []byte(r.Node + "\x00" + r.Run + "\x00" + r.Worker)
}

var bucketName = []byte("workers")

// selfIdentity is this process's identity, which cannot change while it runs.
var selfIdentity = sync.OnceValues(func() (Identity, error) { return ReadIdentity(os.Getpid()) })

// Registry is the list of worker processes of every run that used a state
// dir, kept in a bbolt file. bbolt holds an exclusive flock for as long as
// the file is open, and several nodes may share one state dir, so the file
// is opened for each operation and closed right after: the nodes take turns
// in milliseconds instead of one locking out the others for its life.
//
// Writes are not fsynced. Records matter only while the processes they name
// can still run, that is, until the next boot, and the page cache survives
// the death of any process, the node's included.
type Registry struct {
	path    string
	timeout time.Duration
	mu      sync.Mutex // in-process turns; the flock orders processes
}

// OpenRegistry opens (creating if needed, 0600) the registry at path,
// usually <state-dir>/registry.db. It refuses an existing file that another
// user owns or could have written, and makes one that others could read
// 0600 (see securePrivateFile): the Reaper kills what the records name.
func OpenRegistry(path string) (*Registry, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("lifecycle: registry: %w", err)
	}
	if err := securePrivateFile(path); err != nil {
		return nil, err
	}
	r := &Registry{path: path, timeout: 5 * time.Second}
	err := r.update(func(*bolt.Bucket) error { return nil })
	if err != nil {
		return nil, err
	}
	return r, nil
}

func (r *Registry) update(fn func(*bolt.Bucket) error) error {
	return r.with(false, func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bucketName)
		if err != nil {
			return err
		}
		return fn(b)
	})
}

func (r *Registry) with(readOnly bool, fn func(*bolt.Tx) error) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	db, err := bolt.Open(r.path, 0o600, &bolt.Options{Timeout: r.timeout, NoSync: true, ReadOnly: readOnly})
	if errors.Is(err, bolterrors.ErrTimeout) {
		return fmt.Errorf("%w: %s locked for %v", ErrRegistryBusy, r.path, r.timeout)
	}
	if err != nil {
		return fmt.Errorf("lifecycle: registry %s: %w", r.path, err)
	}
	if readOnly {
		err = db.View(fn)
	} else {
		err = db.Update(fn)
	}
	if cerr := db.Close(); err == nil && cerr != nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("lifecycle: registry %s: %w", r.path, err)
	}
	return nil
}

// Put stores rec, replacing the record of the same node, run and worker. It
// records the calling process as the run's node (Record.NodeIdentity): only
// the node of a run writes its records.
func (r *Registry) Put(rec Record) error {
	if !validName(rec.Node) || !validName(rec.Run) || !validName(rec.Worker) {
		return fmt.Errorf("%w: record %q/%q/%q", ErrInvalidName, rec.Node, rec.Run, rec.Worker)
	}
	self, err := selfIdentity()
	if err != nil {
		return fmt.Errorf("lifecycle: registry: %w", err)
	}
	rec.NodePID, rec.NodeStartTime, rec.NodeBootID = self.PID, self.StartTime, self.BootID
	v, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("lifecycle: registry: %w", err)
	}
	return r.update(func(b *bolt.Bucket) error { return b.Put(rec.key(), v) })
}

// Delete removes the record of a worker; deleting a missing one is no error.
func (r *Registry) Delete(node, run, worker string) error {
	key := Record{Node: node, Run: run, Worker: worker}.key()
	return r.update(func(b *bolt.Bucket) error { return b.Delete(key) })
}

// deleteIf removes rec only if the stored record still equals it, so that a
// record read by the Reaper and updated by its node in between survives.
func (r *Registry) deleteIf(rec Record) error {
	want, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("lifecycle: registry: %w", err)
	}
	return r.update(func(b *bolt.Bucket) error {
		if bytes.Equal(b.Get(rec.key()), want) {
			return b.Delete(rec.key())
		}
		return nil
	})
}

// List returns every record, ordered by node, run and worker.
func (r *Registry) List() ([]Record, error) {
	var recs []Record
	err := r.with(true, func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketName)
		if b == nil {
			return nil
		}
		return b.ForEach(func(k, v []byte) error {
			var rec Record
			if err := json.Unmarshal(v, &rec); err != nil {
				return fmt.Errorf("record %q: %w", k, err)
			}
			recs = append(recs, rec)
			return nil
		})
	})
	return recs, err
}
