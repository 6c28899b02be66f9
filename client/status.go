package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/protocol"
)

// JobInfo is a job's status as the status bucket holds it: state, attempts,
// node, worker, timestamps, last error, last progress (docs/protocol.md,
// "Job status").
type JobInfo = protocol.JobStatus

// TypeNoStatus: the status bucket has no entry for the job: its id is
// unknown, or its status is older than the bucket keeps (the results'
// retention, 24 h by default).
const TypeNoStatus = "NoStatus"

// statusBucket returns the jobs' status bucket, which the nodes create.
func (c *Client) statusBucket(ctx context.Context) (jetstream.KeyValue, error) {
	c.mu.Lock()
	kv := c.status
	c.mu.Unlock()
	if kv != nil {
		return kv, nil
	}
	name := protocol.StatusBucket(c.subjects.Root())
	lctx, cancel := context.WithTimeout(ctx, jsTimeout)
	defer cancel()
	kv, err := c.js.KeyValue(lctx, name)
	switch {
	case errors.Is(err, jetstream.ErrBucketNotFound):
		return nil, localError(call.CodeUnavailable, TypeNoStream, err, "no %s bucket: is a poolnode of this version running?", name)
	case errors.Is(err, jetstream.ErrJetStreamNotEnabled), errors.Is(err, nats.ErrNoResponders):
		if err := c.noJetStream(ctx); err != nil {
			return nil, err
		}
		return nil, localError(call.CodeUnavailable, TypeNoStream, err, "no %s bucket: is a poolnode running?", name)
	case err != nil && ctx.Err() != nil:
		return nil, ctx.Err()
	case err != nil:
		return nil, fmt.Errorf("status bucket %s: %w", name, err)
	}
	c.mu.Lock()
	c.status = kv
	c.mu.Unlock()
	return kv, nil
}

// Info returns the job's status: its state (JobPending, JobRunning, ...),
// attempts, node, worker, timestamps, last error and last progress. A job
// the bucket has no word of fails with ErrNotFound (type NoStatus).
func (j *Job) Info(ctx context.Context) (*JobInfo, error) {
	kv, err := j.c.statusBucket(ctx)
	if err != nil {
		return nil, err
	}
	if err := checkName("job id", j.ID); err != nil {
		return nil, err
	}
	gctx, cancel := context.WithTimeout(ctx, jsTimeout)
	defer cancel()
	e, err := kv.Get(gctx, protocol.StatusKey(j.c.pool, j.ID))
	switch {
	case errors.Is(err, jetstream.ErrKeyNotFound):
		return nil, localError(call.CodeNotFound, TypeNoStatus, err,
			"no status for job %s in pool %s: unknown, or older than the status bucket keeps", j.ID, j.c.pool)
	case err != nil && ctx.Err() != nil:
		return nil, ctx.Err()
	case err != nil:
		return nil, fmt.Errorf("status of job %s: %w", j.ID, err)
	}
	var info JobInfo
	if err := json.Unmarshal(e.Value(), &info); err != nil {
		return nil, fmt.Errorf("status of job %s is not a job status: %w", j.ID, err)
	}
	return &info, nil
}

// Status returns the job's state: pending, scheduled, running, retrying,
// done, failed, dead or cancelled (protocol.Job*).
func (j *Job) Status(ctx context.Context) (string, error) {
	info, err := j.Info(ctx)
	if err != nil {
		return "", err
	}
	return info.State, nil
}

// Progress returns the last progress value the job's function reported
// (JSON), or nil when it reported none.
func (j *Job) Progress(ctx context.Context) (json.RawMessage, error) {
	info, err := j.Info(ctx)
	if err != nil {
		return nil, err
	}
	return info.Progress, nil
}

// Cancel cancels the job: a job no node took yet never runs, a running one
// is stopped (an async function is cancelled; a sync one's worker is
// replaced if it does not return within the node's grace), and Result then
// fails with ErrCancelled. It returns false, and changes nothing, when the
// job had already ended (done, failed, dead or cancelled: see Status). It
// needs the job's status (a job submitted by this client or the Python
// one has it from the start): none fails with ErrNotFound.
func (j *Job) Cancel(ctx context.Context) (bool, error) {
	c := j.c
	kv, err := c.statusBucket(ctx)
	if err != nil {
		return false, err
	}
	if err := checkName("job id", j.ID); err != nil {
		return false, err
	}
	key := protocol.StatusKey(c.pool, j.ID)
	var was string // the state the cancel replaced
	for {
		cctx, cancel := context.WithTimeout(ctx, jsTimeout)
		done, retry, err := tryCancel(cctx, kv, key, j.ID, c.pool, &was)
		cancel()
		switch {
		case err != nil && ctx.Err() != nil:
			return false, ctx.Err()
		case err != nil:
			return false, err
		case retry:
			continue
		case done:
			return false, nil
		}
		break
	}
	// A delayed job fires now, for a node to settle it as cancelled.
	if was == protocol.JobScheduled {
		if err := c.fireCancelled(ctx, j.ID); err != nil {
			return true, err
		}
	}
	// The status says cancelled from now on, so a node that has not
	// started the job never will; the one running it learns here.
	if err := c.nc.Publish(c.subjects.CancelJob(c.pool, j.ID), nil); err != nil {
		return true, fmt.Errorf("job %s is cancelled, but its node could not be told (it will run to its end): %w", j.ID, err)
	}
	fctx, cancel := context.WithTimeout(ctx, jsTimeout) // Flush needs a deadline
	defer cancel()
	if err := c.nc.FlushWithContext(fctx); err != nil {
		return true, fmt.Errorf("job %s is cancelled, but its node may not have been told (it will run to its end): %w", j.ID, err)
	}
	return true, nil
}

// tryCancel is one compare-and-set of Cancel: ended when the job had
// ended, retry when another writer got in between.
func tryCancel(ctx context.Context, kv jetstream.KeyValue, key, id, pool string, was *string) (ended, retry bool, err error) {
	e, err := kv.Get(ctx, key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return false, false, localError(call.CodeNotFound, TypeNoStatus, err,
			"no status for job %s in pool %s, so it cannot be cancelled: unknown, or older than the status bucket keeps", id, pool)
	}
	if err != nil {
		return false, false, fmt.Errorf("status of job %s: %w", id, err)
	}
	var st JobInfo
	if err := json.Unmarshal(e.Value(), &st); err != nil {
		return false, false, fmt.Errorf("status of job %s is not a job status: %w", id, err)
	}
	if protocol.FinalState(st.State) {
		return true, false, nil
	}
	*was = st.State
	now := time.Now().UTC()
	st.State, st.Finished, st.Updated = protocol.JobCancelled, now, now
	st.Error = &protocol.ErrorDetail{Code: call.CodeCancelled, Type: call.TypeCancelled, Message: "the job was cancelled"}
	b, err := json.Marshal(st)
	if err != nil {
		return false, false, err
	}
	_, err = kv.Update(ctx, key, b, e.Revision())
	if lostRace(err) {
		return false, true, nil
	}
	return false, false, err
}

// lostRace says err is a compare-and-set that lost to another writer.
func lostRace(err error) bool {
	var ae *jetstream.APIError
	return errors.Is(err, jetstream.ErrKeyExists) || (errors.As(err, &ae) && (ae.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence || ae.ErrorCode == jsErrWrongLastSequenceConstant))
}

// setPending records a job just queued as pending, unless a node wrote its
// status first or a later submission of the id did. Best effort: the job is
// queued whatever happens here, and the node's "running" follows.
func (c *Client) setPending(ctx context.Context, j *Job) {
	kv, err := c.statusBucket(ctx)
	if err != nil {
		return
	}
	key := protocol.StatusKey(c.pool, j.ID)
	for range 8 {
		sctx, cancel := context.WithTimeout(ctx, jsTimeout)
		retry := trySetPending(sctx, kv, key, c.pool, j)
		cancel()
		if !retry {
			return
		}
	}
}

func trySetPending(ctx context.Context, kv jetstream.KeyValue, key, pool string, j *Job) (retry bool) {
	var rev uint64
	e, err := kv.Get(ctx, key)
	switch {
	case errors.Is(err, jetstream.ErrKeyNotFound):
	case err != nil:
		return false
	default:
		var st JobInfo
		if json.Unmarshal(e.Value(), &st) == nil && st.Seq >= j.Seq {
			return false // a node took it already, or a later submission is there
		}
		rev = e.Revision()
	}
	now := time.Now().UTC()
	state := protocol.JobPending
	if !j.At.IsZero() {
		state = protocol.JobScheduled
	}
	b, _ := json.Marshal(JobInfo{ID: j.ID, Pool: pool, Function: j.function, Seq: j.Seq, State: state, Submitted: now, Updated: now})
	if rev == 0 {
		_, err = kv.Create(ctx, key, b)
	} else {
		_, err = kv.Update(ctx, key, b, rev)
	}
	// Only a lost race is worth another round: a node wrote meanwhile.
	return lostRace(err)
}

// jsErrWrongLastSequenceConstant is what newer servers answer, in place of
// JSErrCodeStreamWrongLastSequence, to an update of a key whose revision
// moved on (nats-server's jetstream_errors_generated.go).
const jsErrWrongLastSequenceConstant jetstream.ErrorCode = 10164
