package bus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/protocol"
)

// statusTries bounds the compare-and-set rounds of one status write: each
// lost round means another writer (the submitter, a cancel, a progress
// report) got in between, which settles within a few rounds.
const statusTries = 8

// ensureStatusBucket finds the jobs' status bucket or creates it, keeping
// each key as long as results is kept (its MaxAge, 0 for ever): a status
// that outlived its result would name a result nobody can read. An
// existing bucket is left as it is, as existing streams are.
func ensureStatusBucket(ctx context.Context, js jetstream.JetStream, prefix string, replicas int, results jetstream.Stream, log *zap.Logger) (jetstream.KeyValue, error) {
	name := protocol.StatusBucket(prefix)
	kv, err := js.KeyValue(ctx, name)
	if err == nil {
		return kv, nil
	}
	if !errors.Is(err, jetstream.ErrBucketNotFound) {
		return nil, fmt.Errorf("status bucket %s: %w", name, err)
	}
	ttl := results.CachedInfo().Config.MaxAge
	kv, err = js.CreateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      name,
		Description: "pyfleet job status, by pool and job id",
		TTL:         ttl,
		Storage:     jetstream.FileStorage,
		Replicas:    max(replicas, 1),
		History:     1,
	})
	if errors.Is(err, jetstream.ErrBucketExists) || errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
		kv, err = js.KeyValue(ctx, name) // another node created it meanwhile
	}
	if err != nil {
		return nil, fmt.Errorf("status bucket %s: %w", name, err)
	}
	log.Info("created status bucket", zap.String("bucket", name), zap.Duration("ttl", ttl))
	return kv, nil
}

// setStatus changes the status of job who by change, which sees the status
// as stored (zero when there is none, or when it is an earlier
// submission's) and returns false to leave it alone. It is a compare and
// set, so that the node, the submitter and a cancel never undo each
// other's writes, and it never replaces the status of a later submission
// of the same id. It returns the status as it stands afterwards. A status
// that cannot be written is logged, never the job's failure: the status is
// for people, the result and the dead letter are the contract.
//
// memo, when not nil, is what the last write of this delivery left: its
// first round then skips reading the key, which saves one of the two round
// trips of each write after a delivery's first. A stale memo (another
// writer got in between) only costs a lost round.
func (j *Jobs) setStatus(who jobIdentity, memo *statusMemo, change func(st *protocol.JobStatus) bool) protocol.JobStatus {
	kv := j.state.Load().status
	key := protocol.StatusKey(j.cfg.Pool, who.id)
	var st protocol.JobStatus
	if kv == nil {
		return st
	}
	if memo == nil {
		memo = &statusMemo{}
	}
	memo.mu.Lock()
	defer memo.mu.Unlock()
	var err error
	for range statusTries {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		st, err = j.trySetStatus(ctx, kv, key, who, memo, change)
		cancel()
		if !errors.Is(err, errStatusRace) {
			break
		}
	}
	if err != nil {
		j.log.Warn("cannot write job status", zap.String("job", who.id), zap.String("key", key), zap.Error(err))
	}
	return st
}

var errStatusRace = errors.New("status changed meanwhile")

// statusMemo is the key's revision and value as one delivery last wrote
// them (rev 0: unknown).
type statusMemo struct {
	mu  sync.Mutex
	rev uint64
	st  protocol.JobStatus
}

func (j *Jobs) trySetStatus(ctx context.Context, kv jetstream.KeyValue, key string, who jobIdentity, memo *statusMemo, change func(*protocol.JobStatus) bool) (protocol.JobStatus, error) {
	var st protocol.JobStatus
	var rev uint64
	if memo.rev != 0 {
		st, rev = memo.st, memo.rev
		st.Progress = slices.Clone(st.Progress)
		st.Error = cloneDetail(st.Error)
	} else {
		e, err := kv.Get(ctx, key)
		switch {
		case errors.Is(err, jetstream.ErrKeyNotFound):
		case err != nil:
			return st, err
		default:
			rev = e.Revision()
			if err := json.Unmarshal(e.Value(), &st); err != nil {
				st = protocol.JobStatus{} // not ours to keep: written over
			}
		}
	}
	memo.rev = 0 // until the write below succeeds
	if st.Seq > who.seq {
		return st, nil // a later submission's
	}
	if st.Seq < who.seq && !adoptsStatus(who, st) {
		st = protocol.JobStatus{}
	}
	st.ID, st.Pool, st.Seq = who.id, j.cfg.Pool, who.seq
	if st.Function == "" && protocol.ValidToken(who.function) == nil {
		st.Function = who.function
	}
	if !change(&st) {
		return st, nil
	}
	st.Updated = time.Now().UTC()
	b, err := json.Marshal(st)
	if err != nil {
		return st, err
	}
	var newRev uint64
	if rev == 0 {
		newRev, err = kv.Create(ctx, key, b)
	} else {
		newRev, err = kv.Update(ctx, key, b, rev)
	}
	var ae *jetstream.APIError
	if errors.Is(err, jetstream.ErrKeyExists) || (errors.As(err, &ae) && (ae.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence || ae.ErrorCode == jsErrWrongLastSequenceConstant)) {
		return st, errStatusRace
	}
	if err == nil {
		memo.rev, memo.st = newRev, st
	}
	return st, err
}

func cloneDetail(e *protocol.ErrorDetail) *protocol.ErrorDetail {
	if e == nil {
		return nil
	}
	c := *e
	return &c
}

// statusRunning records that delivery d starts, and returns false when the
// job was cancelled: then it must not run.
func (j *Jobs) statusRunning(d *delivery) bool {
	st := j.setStatus(d.jobIdentity, &d.status, func(st *protocol.JobStatus) bool {
		if st.State == protocol.JobCancelled {
			return false
		}
		st.State = protocol.JobRunning
		st.Attempts = d.n
		if st.Submitted.IsZero() {
			st.Submitted = d.submitted
		}
		st.Node = j.cfg.Node
		st.Worker = ""
		st.Started = time.Now().UTC()
		return true
	})
	// A later submission's status (a higher seq) says nothing of this one.
	return st.State != protocol.JobCancelled || st.Seq != d.seq
}

// statusEnd records how delivery n of job who ended: state, with the
// worker that ran it and the error, if any. ranHere is false for a job
// whose node died (the advisory of its last delivery), which keeps the
// node of its last start. A cancelled job stays cancelled.
func (j *Jobs) statusEnd(who jobIdentity, memo *statusMemo, n uint64, state, worker string, e *call.Error, ranHere bool) {
	j.setStatus(who, memo, func(st *protocol.JobStatus) bool {
		if st.State == protocol.JobCancelled {
			return false
		}
		st.State = state
		st.Attempts = max(st.Attempts, n)
		if ranHere {
			st.Node = j.cfg.Node
		}
		if worker != "" {
			st.Worker = worker
		}
		if e != nil {
			st.Error = &protocol.ErrorDetail{Code: e.Code, Type: e.Type, Message: shortError(e, maxStoredError).Message}
			if e.Worker != "" {
				st.Worker = e.Worker
			}
		}
		if protocol.FinalState(state) {
			st.Finished = time.Now().UTC()
		}
		return true
	})
}

// Progress records value (any JSON) as the last progress of job id, if it
// runs on this node; it is the hook through which a function's progress
// reports reach the status bucket (Job.Progress in the clients). It
// returns false when no such job runs here. Callers rate-limit: each call
// is one compare-and-set on the bucket.
func (j *Jobs) Progress(id string, value json.RawMessage) bool {
	d := j.runningJob(id)
	if d == nil || !json.Valid(value) {
		return false
	}
	st := j.setStatus(d.jobIdentity, &d.status, func(st *protocol.JobStatus) bool {
		if protocol.FinalState(st.State) {
			return false // a late report must not touch a finished job
		}
		st.Progress = append(json.RawMessage(nil), value...)
		return true
	})
	return string(st.Progress) == string(value)
}

// onCancel stops the job a cancel message names if it runs on this node
// and its status says it was cancelled: the message alone, which anyone
// who may publish could send, cancels nothing.
func (j *Jobs) onCancel(m *nats.Msg) {
	id := lastToken(m.Subject)
	d := j.runningJob(id)
	if d == nil {
		return
	}
	kv := j.state.Load().status
	if kv == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	e, err := kv.Get(ctx, protocol.StatusKey(j.cfg.Pool, id))
	if err != nil {
		d.log.Warn("cancel message, and the job's status cannot be read; the job runs on", zap.Error(err))
		return
	}
	var st protocol.JobStatus
	if json.Unmarshal(e.Value(), &st) != nil || st.State != protocol.JobCancelled || st.Seq != d.seq {
		d.log.Warn("cancel message for a job whose status is not cancelled; ignored", zap.String("state", st.State))
		return
	}
	d.cancel()
}

// runningJob is the delivery of job id running on this node, or nil.
func (j *Jobs) runningJob(id string) *delivery {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.active[id]
}

// track registers d as running on this node until the returned func is
// called, for Progress and cancel to find it.
func (j *Jobs) track(d *delivery) func() {
	j.mu.Lock()
	j.active[d.id] = d
	j.mu.Unlock()
	return func() {
		j.mu.Lock()
		if j.active[d.id] == d {
			delete(j.active, d.id)
		}
		j.mu.Unlock()
	}
}

// jsErrWrongLastSequenceConstant is what newer servers answer, in place of
// JSErrCodeStreamWrongLastSequence, to an update of a key whose revision
// moved on (nats-server's jetstream_errors_generated.go).
const jsErrWrongLastSequenceConstant jetstream.ErrorCode = 10164
