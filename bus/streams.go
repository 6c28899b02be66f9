package bus

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/pyfleet/pyfleet/protocol"
)

// StreamNames are the JetStream streams of one prefix.
type StreamNames struct {
	Jobs, Results, Dead, Events string
}

// Streams names the streams of prefix: PYFLEET_JOBS and so on for the
// default prefix, <PREFIX>_JOBS for another, so that two prefixes can share
// an account.
func Streams(prefix string) StreamNames {
	base := "PYFLEET"
	if prefix != "" && prefix != protocol.DefaultPrefix {
		base = strings.ToUpper(safeName(prefix))
	}
	return StreamNames{Jobs: base + "_JOBS", Results: base + "_RESULTS", Dead: base + "_DEAD", Events: base + "_EVENTS"}
}

// StreamConfigs are the streams of prefix ("" means DefaultPrefix) as a
// node creates them when they are missing, with replicas replicas (0 means
// 1). docs/protocol.md ("Jobs") describes them; an operator who wants other
// settings creates the streams first, and the nodes leave them alone.
func StreamConfigs(prefix string, replicas int) []jetstream.StreamConfig {
	names := Streams(prefix)
	p := protocol.Subjects{Prefix: prefix}.Root()
	r := max(replicas, 1)
	return []jetstream.StreamConfig{{
		Name:        names.Jobs,
		Description: "pyfleet jobs waiting to run",
		Subjects:    []string{p + ".job.>", p + ".sched.>"},
		Retention:   jetstream.WorkQueuePolicy,
		Storage:     jetstream.FileStorage,
		Duplicates:  2 * time.Minute,
		Replicas:    r,
		// Delayed and recurring jobs are schedules in this stream
		// (bus/schedule.go); the server needs roll-ups for them.
		AllowMsgSchedules: true,
		AllowRollup:       true,
	}, {
		Name:        names.Results,
		Description: "pyfleet job results, by job id",
		Subjects:    []string{p + ".result.>"},
		Storage:     jetstream.FileStorage,
		MaxAge:      24 * time.Hour,
		// One result per job id is all a lookup ever reads.
		MaxMsgsPerSubject: 1,
		Duplicates:        2 * time.Minute,
		Replicas:          r,
	}, {
		Name:        names.Dead,
		Description: "pyfleet jobs that will not be run again, with their last error",
		Subjects:    []string{p + ".dead.>"},
		Storage:     jetstream.FileStorage,
		Duplicates:  2 * time.Minute,
		Replicas:    r,
	}, {
		Name:        names.Events,
		Description: "pyfleet lifecycle events",
		Subjects:    []string{p + ".evt.>"},
		Storage:     jetstream.FileStorage,
		MaxAge:      24 * time.Hour,
		Replicas:    r,
	}}
}

// EnsureStreams creates the streams of StreamConfigs that are missing, with
// one replica. A stream that exists is left as it is, since an operator may
// have tuned it (replicas, limits); a warning says when it no longer
// captures our subjects.
func EnsureStreams(ctx context.Context, nc *nats.Conn, prefix string, log *zap.Logger) error {
	js, err := jetstream.New(nc)
	if err != nil {
		return fmt.Errorf("JetStream: %w", err)
	}
	if log == nil {
		log = zap.NewNop()
	}
	return ensureStreams(ctx, js, prefix, 1, log)
}

func ensureStreams(ctx context.Context, js jetstream.JetStream, prefix string, replicas int, log *zap.Logger) error {
	for _, cfg := range StreamConfigs(prefix, replicas) {
		if err := ensureStream(ctx, js, cfg, log); err != nil {
			return err
		}
		if cfg.AllowMsgSchedules {
			ensureSchedules(ctx, js, cfg, log)
		}
	}
	return nil
}

func ensureStream(ctx context.Context, js jetstream.JetStream, cfg jetstream.StreamConfig, log *zap.Logger) error {
	s, err := js.Stream(ctx, cfg.Name)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		_, err = js.CreateStream(ctx, cfg)
		if err == nil {
			log.Info("created stream", zap.String("stream", cfg.Name), zap.String("subject", cfg.Subjects[0]))
			return nil
		}
		if errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			// Another node created it in the meantime.
			s, err = js.Stream(ctx, cfg.Name)
		}
	}
	if err != nil {
		return fmt.Errorf("stream %s on %s: %w", cfg.Name, cfg.Subjects[0], err)
	}
	if have := s.CachedInfo().Config.Subjects; !slices.Contains(have, cfg.Subjects[0]) {
		log.Warn("existing stream does not capture pyfleet's subject; left as it is",
			zap.String("stream", cfg.Name), zap.String("subject", cfg.Subjects[0]), zap.Strings("its_subjects", have))
	}
	return nil
}
