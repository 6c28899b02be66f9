package ui

import (
	"context"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pyfleet/pyfleet/client"
	"github.com/pyfleet/pyfleet/protocol"
)

//go:embed assets
var assets embed.FS

// Defaults of Config.
const (
	DefaultPoll = time.Second
	// DefaultGone is how long a node may stay silent before it is shown
	// gone: three polls missed, not one, since a busy node may answer late.
	DefaultGone = 3 * time.Second
	// pushEvery coalesces changes: at most 4 pushes a second to each page.
	pushEvery = 250 * time.Millisecond
	maxEvents = 500
	maxSeries = 300 // points per function chart: 5 min at one poll a second
	maxDead   = 100
)

// Config configures a Server.
type Config struct {
	Client *client.Client // its connection and prefix are the fleet's
	// Actions allows the page's actions (requeue, discard, cancel,
	// recycle, drain); off, they answer 403.
	Actions bool
	Poll    time.Duration // 0: DefaultPoll
	Gone    time.Duration // 0: DefaultGone
	Log     *log.Logger   // actions and failures; nil: the standard logger
}

// Server is the state of the fleet as the page shows it, and the HTTP
// handler that serves the page.
type Server struct {
	cfg  Config
	nc   *nats.Conn
	js   jetstream.JetStream
	subj protocol.Subjects
	log  *log.Logger

	mu      sync.Mutex
	version uint64 // bumped on every change; pages push when it moved
	nodes   map[string]*nodeState
	events  []client.Event
	series  map[string][]point
	jobs    jobsState
	actions []actionRecord
	changed chan struct{} // closed and replaced on every change

	clientsMu sync.Mutex
	clients   map[string]*client.Client // per pool, for jobs actions
}

type nodeState struct {
	Status   client.NodeStatus `json:"status"`
	LastSeen time.Time         `json:"last_seen"`
	Gone     bool              `json:"gone"`
}

type point struct {
	T     int64   `json:"t"` // unix ms
	Rate  float64 `json:"rate"`
	P50   float64 `json:"p50"`
	P99   float64 `json:"p99"`
	Calls uint64  `json:"calls"`
	Errs  uint64  `json:"errors"`
}

type actionRecord struct {
	TS     time.Time `json:"ts"`
	By     string    `json:"by"`
	Action string    `json:"action"`
	Target string    `json:"target"`
	Error  string    `json:"error,omitempty"`
}

// New returns a Server for cfg; Run keeps its state current.
func New(cfg Config) (*Server, error) {
	if cfg.Client == nil {
		return nil, errors.New("ui: Config.Client is nil")
	}
	if cfg.Poll <= 0 {
		cfg.Poll = DefaultPoll
	}
	if cfg.Gone <= 0 {
		cfg.Gone = DefaultGone
	}
	if cfg.Log == nil {
		cfg.Log = log.Default()
	}
	js, err := jetstream.New(cfg.Client.Conn())
	if err != nil {
		return nil, err
	}
	return &Server{
		cfg: cfg, nc: cfg.Client.Conn(), js: js, subj: cfg.Client.Subjects(), log: cfg.Log,
		nodes: map[string]*nodeState{}, series: map[string][]point{},
		changed: make(chan struct{}), clients: map[string]*client.Client{},
	}, nil
}

// Run polls the nodes and the jobs and follows the events until ctx ends,
// and waits for all it started.
func (s *Server) Run(ctx context.Context) {
	var wg sync.WaitGroup
	for _, fn := range []func(context.Context){s.pollNodes, s.followEvents, s.pollJobs} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			fn(ctx)
		}()
	}
	wg.Wait()
	s.clientsMu.Lock()
	for _, c := range s.clients {
		c.Close()
	}
	s.clients = map[string]*client.Client{}
	s.clientsMu.Unlock()
}

// touch records a change; s.mu must be held.
func (s *Server) touch() {
	s.version++
	close(s.changed)
	s.changed = make(chan struct{})
}

func (s *Server) pollNodes(ctx context.Context) {
	t := time.NewTicker(s.cfg.Poll)
	defer t.Stop()
	for {
		// The wait is most of a poll, so a slow node still makes it.
		sts, err := s.cfg.Client.NodeStatuses(ctx, client.WithTimeout(s.cfg.Poll*7/10))
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			s.log.Printf("ui: node status: %v", err)
		} else {
			s.applyStatuses(sts, time.Now())
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func nodeKey(pool, node string) string { return pool + "/" + node }

func (s *Server) applyStatuses(sts []client.NodeStatus, now time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, st := range sts {
		k := nodeKey(st.Pool, st.Node)
		n := s.nodes[k]
		if n == nil || n.Status.Run != st.Run {
			n = &nodeState{}
			s.nodes[k] = n
		}
		n.Status, n.LastSeen, n.Gone = st, now, false
	}
	for k, n := range s.nodes {
		if now.Sub(n.LastSeen) > s.cfg.Gone {
			n.Gone = true
		}
		if now.Sub(n.LastSeen) > 10*time.Minute {
			delete(s.nodes, k)
		}
	}
	// One point per function per poll, the fleet's: rates and counts add
	// up across nodes; for latency the worst node's is shown, since
	// percentiles do not add.
	agg := map[string]*point{}
	for _, n := range s.nodes {
		if n.Gone {
			continue
		}
		for name, f := range n.Status.Functions {
			p := agg[name]
			if p == nil {
				p = &point{T: now.UnixMilli()}
				agg[name] = p
			}
			p.Rate += f.Rate
			p.P50 = max(p.P50, f.P50Ms)
			p.P99 = max(p.P99, f.P99Ms)
			p.Calls += f.Calls
			for _, v := range f.Errors {
				p.Errs += v
			}
		}
	}
	for name, p := range agg {
		ser := append(s.series[name], *p)
		if len(ser) > maxSeries {
			ser = slices.Delete(ser, 0, len(ser)-maxSeries)
		}
		s.series[name] = ser
	}
	s.touch()
}

func (s *Server) followEvents(ctx context.Context) {
	for ctx.Err() == nil {
		for m, err := range s.cfg.Client.Events(ctx, client.EventFilter{}) {
			if err != nil {
				var ee *client.EventError
				if errors.As(err, &ee) {
					continue
				}
				s.log.Printf("ui: events: %v", err)
				break
			}
			s.addEvent(m.Event)
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

func (s *Server) addEvent(e client.Event) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.events = append(s.events, e)
	if len(s.events) > maxEvents {
		s.events = slices.Delete(s.events, 0, len(s.events)-maxEvents)
	}
	// A node that says it stopped is gone now, not after its silence.
	if e.Kind == "node_stopped" {
		if n := s.nodes[nodeKey(e.Pool, e.Node)]; n != nil && (e.Run == "" || e.Run == n.Status.Run) {
			n.Gone = true
		}
	}
	s.touch()
}

// state is what the page gets on every push.
type state struct {
	Version uint64             `json:"version"`
	Now     time.Time          `json:"now"`
	Actions bool               `json:"actions"`
	Nodes   []*nodeState       `json:"nodes"`
	Events  []client.Event     `json:"events"`
	Series  map[string][]point `json:"series"`
	Jobs    jobsState          `json:"jobs"`
	Log     []actionRecord     `json:"log"`
}

func (s *Server) snapshot() ([]byte, uint64, <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := state{
		Version: s.version, Now: time.Now().UTC(), Actions: s.cfg.Actions,
		Events: s.events, Series: s.series, Jobs: s.jobs, Log: s.actions,
		Nodes: []*nodeState{},
	}
	if st.Events == nil {
		st.Events = []client.Event{}
	}
	for _, n := range s.nodes {
		st.Nodes = append(st.Nodes, n)
	}
	slices.SortFunc(st.Nodes, func(a, b *nodeState) int {
		return strings.Compare(nodeKey(a.Status.Pool, a.Status.Node), nodeKey(b.Status.Pool, b.Status.Node))
	})
	b, err := json.Marshal(st)
	if err != nil {
		b = []byte(fmt.Sprintf(`{"error":%q}`, err.Error()))
	}
	return b, s.version, s.changed
}

// Handler serves the page, its stream and its actions.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	sub, _ := fs.Sub(assets, "assets")
	mux.Handle("GET /", http.FileServerFS(sub))
	mux.HandleFunc("GET /api/state", func(w http.ResponseWriter, r *http.Request) {
		b, _, _ := s.snapshot()
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(b)
	})
	mux.HandleFunc("GET /api/stream", s.stream)
	mux.HandleFunc("POST /api/action", s.action)
	return mux
}

// stream pushes the state as server-sent events: at once, then whenever it
// changed, at most every pushEvery.
func (s *Server) stream(w http.ResponseWriter, r *http.Request) {
	fl, ok := w.(http.Flusher)
	if !ok {
		http.Error(w, "streaming unsupported", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-store")
	var sent uint64
	tick := time.NewTicker(pushEvery)
	defer tick.Stop()
	first := true
	for {
		b, v, changed := s.snapshot()
		if first || v != sent {
			if _, err := fmt.Fprintf(w, "data: %s\n\n", b); err != nil {
				return
			}
			fl.Flush()
			sent, first = v, false
		}
		select {
		case <-r.Context().Done():
			return
		case <-changed:
		}
		select { // coalesce whatever else changes before the next tick
		case <-r.Context().Done():
			return
		case <-tick.C:
		}
	}
}
