package metrics

import (
	"slices"
	"strconv"
	"sync"
	"time"
)

// Window keeps per-function figures over the last few minutes for the
// node's status endpoint (docs/protocol.md, "Node status"): the Prometheus
// histograms serve scrapes, which want totals since start, while an
// operator looking at a live view wants "now". It keeps at most
// windowSamples latencies for each of at most MaxFunctions names (plus the
// unknown and other ones), so memory stays bounded under any load and any
// names callers make up; p50/p99 are then over the recent window or the last samples,
// whichever is fewer.
type Window struct {
	span time.Duration
	mu   sync.Mutex
	fns  map[string]*fnWindow
	now  func() time.Time
}

const windowSamples = 2048

type fnWindow struct {
	calls  uint64
	errors map[string]uint64 // by code
	ring   [windowSamples]sample
	next   int
	filled bool
}

type sample struct {
	at time.Time
	d  time.Duration
}

// FunctionFigures is one function's figures in a node's status.
type FunctionFigures struct {
	Calls  uint64            `json:"calls"`            // since the node started
	Errors map[string]uint64 `json:"errors,omitempty"` // since the node started, by code
	// Recent is how many calls ended within WindowS seconds; Rate is
	// Recent per second over the window; P50Ms and P99Ms their latency.
	Recent  int     `json:"recent"`
	WindowS float64 `json:"window_s"`
	Rate    float64 `json:"rate"`
	P50Ms   float64 `json:"p50_ms"`
	P99Ms   float64 `json:"p99_ms"`
}

// NewWindow returns a Window over the last span (0: one minute).
func NewWindow(span time.Duration) *Window {
	if span <= 0 {
		span = time.Minute
	}
	return &Window{span: span, fns: map[string]*fnWindow{}, now: time.Now}
}

// Observe records one answered call; its signature is
// bus.ServiceConfig.Observe's. It is on the request path: a lock and a
// store.
func (w *Window) Observe(function string, code int, d time.Duration) {
	now := w.now()
	w.mu.Lock()
	defer w.mu.Unlock()
	// The name comes from the caller's subject: made-up ones (a 404) share
	// one entry, and past MaxFunctions names another, as the Prometheus
	// labels do (metrics.go), since each entry holds a ring of samples.
	if function == "" || code == 404 {
		function = UnknownFunction
	}
	f := w.fns[function]
	if f == nil {
		if len(w.fns) >= MaxFunctions {
			function = OtherFunction
			f = w.fns[function]
		}
		if f == nil {
			f = &fnWindow{errors: map[string]uint64{}}
			w.fns[function] = f
		}
	}
	f.calls++
	if code != 200 {
		f.errors[strconv.Itoa(code)]++
	}
	f.ring[f.next] = sample{now, d}
	f.next = (f.next + 1) % windowSamples
	if f.next == 0 {
		f.filled = true
	}
}

// Snapshot returns every function's figures now.
func (w *Window) Snapshot() map[string]FunctionFigures {
	now := w.now()
	from := now.Add(-w.span)
	w.mu.Lock()
	defer w.mu.Unlock()
	out := make(map[string]FunctionFigures, len(w.fns))
	for name, f := range w.fns {
		n := f.next
		if f.filled {
			n = windowSamples
		}
		ds := make([]time.Duration, 0, n)
		oldest := now
		for i := range n {
			s := f.ring[i]
			if s.at.After(from) {
				ds = append(ds, s.d)
				if s.at.Before(oldest) {
					oldest = s.at
				}
			}
		}
		span := w.span
		if f.filled && len(ds) == windowSamples {
			// The ring holds less than the window: the rate is over what it holds.
			span = max(now.Sub(oldest), time.Millisecond)
		}
		fig := FunctionFigures{Calls: f.calls, Recent: len(ds), WindowS: span.Seconds(), Rate: float64(len(ds)) / span.Seconds()}
		if len(f.errors) > 0 {
			fig.Errors = make(map[string]uint64, len(f.errors))
			for k, v := range f.errors {
				fig.Errors[k] = v
			}
		}
		if len(ds) > 0 {
			slices.Sort(ds)
			fig.P50Ms = ms(ds[quantileIndex(len(ds), 0.50)])
			fig.P99Ms = ms(ds[quantileIndex(len(ds), 0.99)])
		}
		out[name] = fig
	}
	return out
}

func quantileIndex(n int, q float64) int {
	i := int(q*float64(n)+0.5) - 1
	return min(max(i, 0), n-1)
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
