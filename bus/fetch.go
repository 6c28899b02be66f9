package bus

import (
	"context"
	"errors"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// pollInterval is how often a node with no idle capacity looks again: the
// request/reply side frees capacity without telling Jobs.
const pollInterval = 100 * time.Millisecond

// maxBatch bounds one fetch, whatever Capacity says.
const maxBatch = 256

// loop pulls jobs while there is idle capacity, the priority levels in
// turn (fetchLevels). It uses Fetch, one pull request at a time for no
// more than the idle capacity, and never Consume
// or Messages: those keep a buffer of jobs filled ahead, and a buffered job
// gets no InProgress, outlives its AckWait and runs twice (nats.go #1929).
func (j *Jobs) loop() {
	defer close(j.loopDone)
	timer := time.NewTimer(pollInterval)
	defer timer.Stop()
	for !j.stopped() {
		n := j.idleSlots()
		if n <= 0 {
			timer.Reset(pollInterval)
			select {
			case <-j.stop:
			case <-j.wake:
			case <-timer.C:
			}
			continue
		}
		st := j.state.Load()
		got, err := j.fetchLevels(st, n)
		if err == nil && got == 0 && !j.stopped() {
			// Nothing waits at any level: wait on the normal one, but not
			// for long, since a high job may come meanwhile.
			_, err = j.fetchInto(st.cons.Fetch(n, jetstream.FetchMaxWait(min(j.cfg.FetchWait, levelWait))))
		}
		if err != nil {
			if errors.Is(err, nats.ErrConnectionClosed) {
				j.log.Error("stop fetching jobs: connection closed")
				return
			}
			j.log.Warn("fetch jobs", zap.Error(err))
			timer.Reset(time.Second)
			select {
			case <-j.stop:
				continue
			case <-timer.C:
			}
			// A pull on a consumer that is gone has no responders.
			if errors.Is(err, jetstream.ErrConsumerDeleted) || errors.Is(err, nats.ErrNoResponders) {
				j.resetup()
			}
		}
	}
}

// levelWait bounds the pull that waits for a job when no level has one: a
// high or low job submitted to an idle node waits up to this long (a
// normal one is delivered by that pull at once), and an idle node sends
// four pull requests a second, three of them cheap ones that return at
// once.
const levelWait = 250 * time.Millisecond

// fetchLevels takes up to n jobs that are waiting now, level by level in
// the order of protocol.Priorities: a lower level gets only the slots the
// higher ones left. The rule is strict, so a steady flow of high jobs that
// keeps every node busy starves the normal and low ones; that is what
// high means here (docs/protocol.md, "Priorities").
func (j *Jobs) fetchLevels(st *jsState, n int) (int, error) {
	got := 0
	for _, cons := range st.levels {
		if got >= n || j.stopped() {
			break
		}
		k, err := j.fetchInto(cons.FetchNoWait(n - got))
		got += k
		if err != nil {
			return got, err
		}
	}
	return got, nil
}

// fetchInto dispatches the jobs of one pull.
func (j *Jobs) fetchInto(batch jetstream.MessageBatch, err error) (int, error) {
	if err != nil {
		return 0, err
	}
	got := 0
	for msg := range batch.Messages() {
		got++
		if j.stopped() {
			// Stop came while the pull was open: hand the job back for
			// another node to run now.
			_ = msg.Nak()
			continue
		}
		j.dispatch(msg)
	}
	return got, batch.Error()
}

func (j *Jobs) resetup() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := j.setup(ctx); err != nil {
		j.log.Error("cannot recreate the jobs consumer", zap.Error(err))
		return
	}
	j.log.Warn("jobs consumer recreated", zap.String("consumer", j.consumerName()))
}

// idleSlots is how many more jobs may be fetched. starting is read before
// Capacity: a job leaves starting only after the handler counts it, so
// read in this order a job moving between the two is counted once or
// twice, never missed.
func (j *Jobs) idleSlots() int {
	j.mu.Lock()
	starting := j.starting
	j.mu.Unlock()
	return min(j.cfg.Capacity()-starting, maxBatch)
}

func (j *Jobs) dispatch(msg jetstream.Msg) {
	j.mu.Lock()
	j.running++
	j.starting++
	j.mu.Unlock()
	go func() {
		defer j.settled()
		j.handle(msg)
	}()
}

// started tells the fetch loop that the handler counts a job in Capacity
// now (call.Request.Admitted), or that it never will. Once a job.
func (j *Jobs) started() {
	j.mu.Lock()
	j.starting--
	j.mu.Unlock()
}

func (j *Jobs) settled() {
	j.mu.Lock()
	j.running--
	if j.stopping && j.running == 0 {
		close(j.idle)
	}
	j.mu.Unlock()
	select {
	case j.wake <- struct{}{}:
	default:
	}
}
