package client

// Delayed and recurring jobs are JetStream message schedules in the jobs
// stream (nats-server >= 2.12): the server fires them, whether or not a
// node runs, so nothing here or in a node has to keep time. bus/schedule.go
// is the node's side; docs/protocol.md ("Jobs: schedules") the contract.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/protocol"
)

// TypeNoSchedules: the NATS server (before 2.12) or the jobs stream (made
// by an older node, and not updated) has no message schedules, so delayed
// and recurring jobs are refused (503). Every other job works.
const TypeNoSchedules = "NoSchedules"

// schedule is when a delayed job is due (WithDelay, WithAt).
type schedule struct {
	delay time.Duration
	at    time.Time
	set   int // how many of the two were given
}

// WithDelay makes Submit's job due d from now: until then its status is
// "scheduled", and the server (not a node) keeps it, so it fires even if
// every node was down meanwhile. d must be positive.
func WithDelay(d time.Duration) Option {
	return func(o *options) { o.when.delay = d; o.when.set++ }
}

// WithAt makes Submit's job due at t, which must be in the future; as
// WithDelay otherwise.
func WithAt(t time.Time) Option {
	return func(o *options) { o.when.at = t; o.when.set++ }
}

func badSchedule(format string, args ...any) *Error {
	return localError(call.CodeBadRequest, call.TypeBadRequest, nil, format, args...)
}

// delayJob turns msg, a job about to be published, into the schedule that
// publishes it when it is due, and returns that time; zero, and msg left
// alone, without WithDelay or WithAt. The job's id goes in Pyfleet-Job-Id
// because the server strips Nats-Msg-Id from what a schedule produces; the
// schedule keeps Nats-Msg-Id, which makes submitting it twice a duplicate.
func (c *Client) delayJob(ctx context.Context, msg *nats.Msg, id string, when schedule) (time.Time, error) {
	if when.set == 0 {
		return time.Time{}, nil
	}
	now := time.Now()
	due := when.at
	switch {
	case when.set > 1:
		return due, badSchedule("job %s: give WithDelay or WithAt, not both", id)
	case !when.at.IsZero() && !when.at.After(now):
		return due, badSchedule("job %s: at %s is in the past (now %s)", id, when.at.UTC().Format(time.RFC3339Nano), now.UTC().Format(time.RFC3339))
	case when.at.IsZero() && when.delay <= 0:
		return due, badSchedule("job %s: delay %v: want a positive duration", id, when.delay)
	case when.at.IsZero():
		due = now.Add(when.delay)
	}
	if err := c.checkScheduleServer(); err != nil {
		return due, err
	}
	due = due.UTC()
	msg.Header.Set(protocol.HeaderSchedule, "@at "+due.Format(time.RFC3339Nano))
	msg.Header.Set(protocol.HeaderScheduleTarget, msg.Subject)
	msg.Header.Set(protocol.HeaderJobID, id)
	msg.Subject = c.subjects.ScheduleAt(c.pool, id)
	return due, nil
}

// checkScheduleServer refuses schedules on a server that would store them
// as plain messages that never fire.
func (c *Client) checkScheduleServer() error {
	v := c.nc.ConnectedServerVersion()
	if olderThan(v, protocol.MinScheduleServer) {
		return localError(call.CodeUnavailable, TypeNoSchedules, nil,
			"delayed and recurring jobs need nats-server >= %s (JetStream message schedules); the server at %s is %s",
			protocol.MinScheduleServer, RedactURLs(c.nc.ConnectedUrl()), v)
	}
	return nil
}

// olderThan compares two "major.minor.patch" versions (a "-beta" and the
// like ignored); an unreadable version is not older.
func olderThan(v, min string) bool {
	parse := func(s string) []int {
		s, _, _ = strings.Cut(strings.TrimPrefix(s, "v"), "-")
		var n []int
		for _, p := range strings.Split(s, ".") {
			i, err := strconv.Atoi(p)
			if err != nil {
				return nil
			}
			n = append(n, i)
		}
		return n
	}
	a, b := parse(v), parse(min)
	if a == nil || b == nil {
		return false
	}
	return slices.Compare(a, b) < 0
}

// schedulesDisabled explains the server's "message schedules is disabled".
func (c *Client) schedulesDisabled(ctx context.Context, cause error) error {
	name, err := c.streamFor(ctx, c.subjects.Schedules(c.pool)+".x", "JOBS")
	if err != nil {
		name = c.streamName("JOBS")
	}
	return localError(call.CodeUnavailable, TypeNoSchedules, cause,
		"the jobs stream %s does not allow message schedules: start a poolnode of this version, which enables them, "+
			"or run `nats stream edit %s --allow-schedules`", name, name)
}

// ScheduleInfo describes a recurring schedule (Client.Schedules).
type ScheduleInfo struct {
	Name     string `json:"name"`
	Cron     string `json:"cron"` // as given to Schedule
	Pattern  string `json:"pattern"`
	Function string `json:"function"`
	// Payload is the argument each firing's job gets, as sent.
	Payload json.RawMessage `json:"payload,omitempty"`
	Created time.Time       `json:"created"`
	Seq     uint64          `json:"seq"`
}

// Schedule makes function run with arg on cron, as a job of its own each
// time (its id <name>-<stream sequence>), until Unschedule(name). A
// schedule of that name already there is replaced. cron is 5 fields
// (minute hour day-of-month month day-of-week, as crontab), 6 (seconds
// first), "@every <duration>" (at least 1s) or @hourly, @daily, @weekly,
// @monthly, @yearly; in UTC. WithTimeout and WithReplyTo apply to each job.
// The server keeps the schedule: it fires with no node running (its job
// then waits for one), but a firing missed while the server itself was
// down is made up once, not once per miss.
func (c *Client) Schedule(ctx context.Context, name, cron, function string, arg any, opts ...Option) (*ScheduleInfo, error) {
	o := collect(opts)
	if err := checkName("schedule name", name); err != nil {
		return nil, err
	}
	if err := checkName("function", function); err != nil {
		return nil, err
	}
	pattern, err := protocol.CronPattern(cron)
	if err != nil {
		return nil, badSchedule("schedule %s: %v", name, err)
	}
	body, err := encode(arg)
	if err != nil {
		return nil, err
	}
	if err := c.checkScheduleServer(); err != nil {
		return nil, err
	}
	msg := nats.NewMsg(c.subjects.ScheduleCron(c.pool, name))
	msg.Data = body
	msg.Header.Set(protocol.HeaderSchedule, pattern)
	msg.Header.Set(protocol.HeaderScheduleTarget, c.subjects.Job(c.pool, function))
	msg.Header.Set(protocol.HeaderCron, strings.TrimSpace(cron))
	if o.timeout > 0 {
		msg.Header.Set(protocol.HeaderTimeout, millis(o.timeout))
	}
	if o.replyTo != "" {
		msg.Header.Set(protocol.HeaderReplyTo, o.replyTo)
	}
	pctx, cancel := context.WithTimeout(ctx, jsTimeout)
	ack, err := c.js.PublishMsg(pctx, msg)
	cancel()
	switch {
	case errors.Is(err, jetstream.ErrSchedulePatternInvalid):
		return nil, badSchedule("schedule %s: cron %q (%s): the NATS server refuses the pattern", name, cron, pattern)
	case errors.Is(err, jetstream.ErrMessageSchedulesDisabled):
		return nil, c.schedulesDisabled(ctx, err)
	case errors.Is(err, jetstream.ErrNoStreamResponse):
		if err := c.noJetStream(ctx); err != nil {
			return nil, err
		}
		return nil, noStream(c.streamName("JOBS"), err)
	case err != nil && ctx.Err() != nil:
		return nil, ctx.Err()
	case err != nil:
		return nil, fmt.Errorf("publishing schedule %s to %s: %w", name, msg.Subject, err)
	}
	return &ScheduleInfo{Name: name, Cron: strings.TrimSpace(cron), Pattern: pattern, Function: function,
		Payload: json.RawMessage(body), Created: time.Now().UTC(), Seq: ack.Sequence}, nil
}

// jobsStream is the stream that holds the pool's schedules.
func (c *Client) jobsStream(ctx context.Context) (jetstream.Stream, error) {
	name, err := c.streamFor(ctx, c.subjects.ScheduleCron(c.pool, "_"), "JOBS")
	if err != nil {
		return nil, err
	}
	sctx, cancel := context.WithTimeout(ctx, jsTimeout)
	defer cancel()
	return c.js.Stream(sctx, name)
}

// Schedules lists the pool's recurring schedules, by name.
func (c *Client) Schedules(ctx context.Context) ([]ScheduleInfo, error) {
	s, err := c.jobsStream(ctx)
	if err != nil {
		return nil, err
	}
	ictx, cancel := context.WithTimeout(ctx, jsTimeout)
	defer cancel()
	filter := c.subjects.ScheduleCron(c.pool, "*")
	info, err := s.Info(ictx, jetstream.WithSubjectFilter(filter))
	if err != nil {
		return nil, fmt.Errorf("listing the schedules in %s: %w", filter, err)
	}
	var out []ScheduleInfo
	for subj := range info.State.Subjects {
		m, err := s.GetLastMsgForSubject(ictx, subj)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue // unscheduled meanwhile
		}
		if err != nil {
			return nil, fmt.Errorf("reading schedule %s: %w", subj, err)
		}
		pattern := protocol.Header(m.Header, protocol.HeaderSchedule)
		if pattern == "" {
			continue // the server's purge marker, not a schedule
		}
		fn := strings.TrimPrefix(protocol.Header(m.Header, protocol.HeaderScheduleTarget), c.subjects.Job(c.pool, ""))
		out = append(out, ScheduleInfo{Name: lastToken(subj), Cron: protocol.Header(m.Header, protocol.HeaderCron), Pattern: pattern,
			Function: fn, Payload: json.RawMessage(m.Data), Created: m.Time.UTC(), Seq: m.Sequence})
	}
	slices.SortFunc(out, func(a, b ScheduleInfo) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

func lastToken(subj string) string {
	return subj[strings.LastIndexByte(subj, '.')+1:]
}

// Unschedule removes the recurring schedule name: it fires no more (a job
// it fired already runs). It returns false when there was none.
func (c *Client) Unschedule(ctx context.Context, name string) (bool, error) {
	if err := checkName("schedule name", name); err != nil {
		return false, err
	}
	s, err := c.jobsStream(ctx)
	if err != nil {
		return false, err
	}
	subj := c.subjects.ScheduleCron(c.pool, name)
	uctx, cancel := context.WithTimeout(ctx, jsTimeout)
	defer cancel()
	m, err := s.GetLastMsgForSubject(uctx, subj)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("schedule %s: %w", name, err)
	}
	if protocol.Header(m.Header, protocol.HeaderSchedule) == "" {
		return false, nil
	}
	if err := s.Purge(uctx, jetstream.WithPurgeSubject(subj)); err != nil {
		return false, fmt.Errorf("removing schedule %s: %w", name, err)
	}
	return true, nil
}

// fireCancelled makes the schedule of delayed job id, if it has not fired
// yet, fire now: the job's status says cancelled already, so the node that
// takes it settles it as cancelled without running it and stores the
// cancelled result that Job.Result reads. Rather than remove the schedule,
// since then no result would ever come. The expected last sequence makes
// this a no-op if the schedule fires meanwhile.
func (c *Client) fireCancelled(ctx context.Context, id string) error {
	subj := c.subjects.ScheduleAt(c.pool, id)
	s, err := c.jobsStream(ctx)
	if err != nil {
		return nil // no jobs stream: nothing scheduled
	}
	fctx, cancel := context.WithTimeout(ctx, jsTimeout)
	defer cancel()
	m, err := s.GetLastMsgForSubject(fctx, subj)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return nil // not a delayed job, or fired already
	}
	if err != nil {
		return fmt.Errorf("job %s is cancelled, but its schedule could not be read (it will be settled when due): %w", id, err)
	}
	if protocol.Header(m.Header, protocol.HeaderSchedule) == "" {
		return nil
	}
	out := nats.NewMsg(subj)
	out.Data = m.Data
	for k, v := range m.Header {
		if k != protocol.HeaderMsgID && !strings.HasPrefix(k, "Nats-Expected") && k != "Nats-Rollup" {
			out.Header[k] = v
		}
	}
	out.Header.Set(protocol.HeaderSchedule, "@at "+time.Now().UTC().Format(time.RFC3339Nano))
	_, err = c.js.PublishMsg(fctx, out, jetstream.WithExpectLastSequencePerSubject(m.Sequence))
	var ae *jetstream.APIError
	if errors.As(err, &ae) && ae.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence {
		return nil // it fired meanwhile; the node sees the cancel
	}
	if err != nil {
		return fmt.Errorf("job %s is cancelled, but its schedule could not be moved (it will be settled when due): %w", id, err)
	}
	return nil
}
