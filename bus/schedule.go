package bus

// Delayed and recurring jobs are JetStream message schedules (nats-server
// >= 2.12) stored in the jobs stream under <prefix>.sched.<pool>.>: the
// server itself publishes each firing to the job subject, so no node has to
// be up for a schedule to keep its time, and nothing in the node schedules
// anything. The node only has to tell a fired job's id (firedID) and keep
// the status a delayed job was given at submission (adoptsStatus).
// docs/protocol.md ("Jobs: schedules") is the contract.

import (
	"context"
	"slices"
	"strconv"
	"strings"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/pyfleet/pyfleet/protocol"
)

// ensureSchedules turns schedules on in a jobs stream that an older node
// created without them: the server allows enabling them (and adding the
// schedule subjects) in place, never disabling them. It changes nothing
// else of the stream, which an operator may have tuned. Failing that, jobs
// run all the same; only delayed and recurring ones are refused, and the
// warning says what to do.
func ensureSchedules(ctx context.Context, js jetstream.JetStream, want jetstream.StreamConfig, log *zap.Logger) {
	s, err := js.Stream(ctx, want.Name)
	if err != nil {
		log.Warn("cannot check the jobs stream for schedules; delayed and recurring jobs may be refused",
			zap.String("stream", want.Name), zap.Error(err))
		return
	}
	cfg := s.CachedInfo().Config
	sched := want.Subjects[len(want.Subjects)-1]
	if cfg.AllowMsgSchedules && slices.Contains(cfg.Subjects, sched) {
		return
	}
	if !slices.Contains(cfg.Subjects, want.Subjects[0]) {
		return // not pyfleet's layout; ensureStream warned already
	}
	if !slices.Contains(cfg.Subjects, sched) {
		cfg.Subjects = append(cfg.Subjects, sched)
	}
	cfg.AllowMsgSchedules, cfg.AllowRollup, cfg.DenyPurge = true, true, false
	info, err := js.UpdateStream(ctx, cfg)
	if err == nil && !info.CachedInfo().Config.AllowMsgSchedules {
		// A server before 2.12 drops the field it does not know.
		log.Warn("the NATS server has no message schedules (needs nats-server >= "+protocol.MinScheduleServer+
			"): delayed and recurring jobs are refused; other jobs run", zap.String("stream", want.Name))
		return
	}
	if err != nil {
		log.Warn("cannot enable message schedules on the existing jobs stream; delayed and recurring jobs are refused. "+
			"Enable them by hand (nats stream edit "+want.Name+" --allow-schedules, and add the subject) or recreate the stream",
			zap.String("stream", want.Name), zap.String("subject", sched), zap.Error(err))
		return
	}
	log.Info("enabled message schedules on the existing jobs stream", zap.String("stream", want.Name), zap.String("subject", sched))
}

// firedID is the id of a job that has no Nats-Msg-Id (the server strips it
// from what a schedule produces), and whether a schedule produced it. A
// delayed job carries its id in Pyfleet-Job-Id; each firing of a recurring
// schedule is a job of its own, named <schedule>-<stream sequence>. Any
// other job is named by its stream sequence, as before schedules.
func firedID(hdr nats.Header, seq uint64) (string, bool) {
	n := strconv.FormatUint(seq, 10)
	scheduler := protocol.Header(hdr, protocol.HeaderScheduler)
	if scheduler == "" {
		return n, false
	}
	tokens := strings.Split(scheduler, ".")
	if len(tokens) < 2 {
		return n, true
	}
	kind, name := tokens[len(tokens)-2], tokens[len(tokens)-1]
	switch kind {
	case "at":
		if id := protocol.Header(hdr, protocol.HeaderJobID); id != "" && safeHeader(protocol.HeaderMsgID, id) {
			return id, true
		}
		return name, true
	case "cron":
		return name + "-" + n, true
	}
	return n, true
}

// adoptsStatus says a fired delayed job takes on the status its submission
// wrote under the schedule's lower sequence, rather than starting afresh as
// a later submission of the id would: "scheduled" keeps its submission
// time, and "cancelled" (the cancel came as it fired) keeps it from running.
func adoptsStatus(who jobIdentity, st protocol.JobStatus) bool {
	return who.fired && st.ID == who.id && (st.State == protocol.JobScheduled || st.State == protocol.JobCancelled)
}
