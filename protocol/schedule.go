package protocol

import (
	"fmt"
	"strings"
	"time"
)

// Headers of JetStream message schedules (nats-server >= 2.12, its
// server/stream.go) and pyfleet's own on a schedule; docs/protocol.md
// ("Jobs: schedules") describes them.
const (
	// HeaderSchedule is the schedule itself: "@at <RFC 3339>", "@every
	// <duration>", a 6-field cron (seconds first) or @hourly and the like.
	HeaderSchedule = "Nats-Schedule"
	// HeaderScheduleTarget is the subject the server publishes to when the
	// schedule fires: a job subject.
	HeaderScheduleTarget = "Nats-Schedule-Target"
	// HeaderScheduler is set by the server on each message a schedule
	// produced: the schedule's subject.
	HeaderScheduler = "Nats-Scheduler"
	// HeaderCron keeps the cron expression of a recurring schedule as the
	// user gave it (HeaderSchedule has it in the server's 6-field form).
	HeaderCron = "Pyfleet-Cron"
)

// MinScheduleServer is the oldest nats-server with message schedules.
const MinScheduleServer = "2.12.0"

// Schedules is the subject tree of every schedule of pool: the jobs stream
// captures it, and no consumer reads it.
func (s Subjects) Schedules(pool string) string {
	return s.Root() + ".sched." + pool
}

// ScheduleAt is the subject of the one-off schedule of a delayed job (its
// id): the server purges it when it fires.
func (s Subjects) ScheduleAt(pool, id string) string {
	return s.Schedules(pool) + ".at." + id
}

// ScheduleCron is the subject of the recurring schedule name.
func (s Subjects) ScheduleCron(pool, name string) string {
	return s.Schedules(pool) + ".cron." + name
}

// cronMacros are the predefined schedules nats-server accepts.
var cronMacros = []string{"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}

// CronPattern turns a recurring schedule as a user writes it into the
// pattern nats-server takes (server/scheduler.go parseMsgSchedule): a
// 5-field cron (minute first, as crontab) gets a 0 seconds field, a 6-field
// one (seconds first) and "@every <duration>" of at least a second pass as
// they are, and so do @hourly, @daily and the other macros. Each field's
// syntax is the server's to check (a bad one is refused at publish); this
// catches what would otherwise be read as another valid schedule.
func CronPattern(expr string) (string, error) {
	e := strings.TrimSpace(expr)
	switch {
	case e == "":
		return "", fmt.Errorf("cron: empty schedule: want 5 fields (minute hour day month weekday), 6 (seconds first), @every <duration> or @hourly/@daily/@weekly/@monthly/@yearly")
	case strings.HasPrefix(e, "@every "):
		d, err := time.ParseDuration(strings.TrimSpace(e[len("@every "):]))
		if err != nil {
			return "", fmt.Errorf("cron %q: %w", expr, err)
		}
		if d < time.Second {
			return "", fmt.Errorf("cron %q: the interval must be at least 1s", expr)
		}
		return "@every " + d.String(), nil
	case strings.HasPrefix(e, "@"):
		for _, m := range cronMacros {
			if e == m {
				return e, nil
			}
		}
		return "", fmt.Errorf("cron %q: unknown macro: want @every <duration>, %s", expr, strings.Join(cronMacros, ", "))
	}
	f := strings.Fields(e)
	switch len(f) {
	case 5:
		return "0 " + strings.Join(f, " "), nil
	case 6:
		return strings.Join(f, " "), nil
	}
	return "", fmt.Errorf("cron %q: %d fields: want 5 (minute hour day month weekday) or 6 (seconds first)", expr, len(f))
}
