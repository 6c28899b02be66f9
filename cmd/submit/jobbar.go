package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/pyfleet/pyfleet/client"
)

// jobBarEvery is how often `submit job --wait` reads the job's status for
// its progress bar: each read is one key-value get.
const jobBarEvery = 250 * time.Millisecond

// startJobBar draws the job's progress on the terminal w while it waits,
// whenever the last progress value is an object with numeric "done" and
// "total" (a function's ctx.progress({"done": 3, "total": 10})), and the
// state otherwise. The returned func stops it, waits for it and clears the
// line.
func startJobBar(ctx context.Context, w io.Writer, job *client.Job) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(jobBarEvery)
		defer t.Stop()
		drawn := false
		for {
			select {
			case <-ctx.Done():
				if drawn {
					io.WriteString(w, "\r\x1b[K")
				}
				return
			case <-t.C:
			}
			info, err := job.Info(ctx)
			if err != nil {
				continue // no status (yet): nothing to draw
			}
			io.WriteString(w, jobBar(info))
			drawn = true
		}
	})
	return func() {
		cancel()
		wg.Wait()
	}
}

// jobBar is one line of the bar for info.
func jobBar(info *client.JobInfo) string {
	var p struct {
		Done  *float64 `json:"done"`
		Total *float64 `json:"total"`
	}
	if json.Unmarshal(info.Progress, &p) != nil || p.Done == nil || p.Total == nil || *p.Total <= 0 {
		line := fmt.Sprintf("job %s: %s", info.ID, info.State)
		if info.Attempts > 1 {
			line += fmt.Sprintf(" (attempt %d)", info.Attempts)
		}
		if len(info.Progress) > 0 && len(info.Progress) < 60 {
			line += " " + string(info.Progress)
		}
		return "\r" + line + "\x1b[K"
	}
	frac := min(max(*p.Done / *p.Total, 0), 1)
	const width = 30
	filled := int(frac * width)
	return fmt.Sprintf("\r[%s%s] %3.0f%% %g/%g  %s\x1b[K",
		strings.Repeat("#", filled), strings.Repeat(".", width-filled), frac*100, *p.Done, *p.Total, info.State)
}
