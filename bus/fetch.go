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

// loop pulls jobs while there is idle capacity. It uses Fetch, one pull
// request at a time for no more than the idle capacity, and never Consume
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
		batch, err := j.state.Load().cons.Fetch(n, jetstream.FetchMaxWait(j.cfg.FetchWait))
		if err == nil {
			for msg := range batch.Messages() {
				if j.stopped() {
					// Stop came while the pull was open: hand the
					// job back for another node to run now.
					_ = msg.Nak()
					continue
				}
				j.dispatch(msg)
			}
			err = batch.Error()
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

func (j *Jobs) resetup() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := j.setup(ctx); err != nil {
		j.log.Error("cannot recreate the jobs consumer", zap.Error(err))
		return
	}
	j.log.Warn("jobs consumer recreated", zap.String("consumer", j.consumerName()))
}

func (j *Jobs) idleSlots() int {
	n := j.cfg.Capacity()
	j.mu.Lock()
	n -= j.starting
	j.mu.Unlock()
	return min(n, maxBatch)
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

// started tells the fetch loop that a job reached Call (or will not), so
// that Capacity now accounts for it.
func (j *Jobs) started(once *bool) {
	if *once {
		return
	}
	*once = true
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
