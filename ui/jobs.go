package ui

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/pyfleet/pyfleet/client"
	"github.com/pyfleet/pyfleet/protocol"
)

// jobsState is the Jobs section: counts per pool/function and the latest
// dead letters.
type jobsState struct {
	Available bool                 `json:"available"` // JetStream and the streams exist
	Counts    map[string]*jobCount `json:"counts"`    // by "pool/function"
	Dead      []deadLetter         `json:"dead"`
}

type jobCount struct {
	Pending int `json:"pending"`
	Running int `json:"running"`
	Dead    int `json:"dead"`
}

type deadLetter struct {
	Seq      uint64                `json:"seq"` // in the dead-letter stream
	Pool     string                `json:"pool"`
	Function string                `json:"function"`
	Time     time.Time             `json:"time"`
	Letter   protocol.DeadLetter   `json:"letter"`
	Error    *protocol.ErrorDetail `json:"error,omitempty"`
}

// streamName mirrors the nodes' naming (bus.Streams, protocol.StatusBucket):
// PYFLEET_<KIND>, or <PREFIX>_<KIND> with the prefix's dots as "_".
func (s *Server) streamName(kind string) string {
	return strings.TrimSuffix(protocol.StatusBucket(s.subj.Prefix), "_STATUS") + "_" + kind
}

func (s *Server) pollJobs(ctx context.Context) {
	// The status bucket says which jobs run; kept for the live ones only,
	// so memory follows the jobs in flight, not the bucket's 24 hours.
	live := map[string]protocol.JobStatus{}
	var watcher jetstream.KeyWatcher
	defer func() {
		if watcher != nil {
			_ = watcher.Stop()
		}
	}()
	t := time.NewTicker(2 * s.cfg.Poll)
	defer t.Stop()
	for {
		if watcher == nil {
			if kv, err := s.js.KeyValue(ctx, protocol.StatusBucket(s.subj.Prefix)); err == nil {
				watcher, _ = kv.WatchAll(ctx, jetstream.IgnoreDeletes())
			}
		}
		if watcher != nil {
		drain:
			for {
				select {
				case e, ok := <-watcher.Updates():
					if !ok {
						watcher = nil
						break drain
					}
					if e == nil {
						continue // the end of the initial values
					}
					var st protocol.JobStatus
					if json.Unmarshal(e.Value(), &st) != nil || protocol.FinalState(st.State) {
						delete(live, e.Key())
						continue
					}
					live[e.Key()] = st
				default:
					break drain
				}
			}
		}
		js := s.readJobs(ctx, live)
		s.mu.Lock()
		s.jobs = js
		s.touch()
		s.mu.Unlock()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (s *Server) readJobs(ctx context.Context, live map[string]protocol.JobStatus) jobsState {
	out := jobsState{Counts: map[string]*jobCount{}}
	count := func(pool, fn string) *jobCount {
		k := pool + "/" + fn
		if out.Counts[k] == nil {
			out.Counts[k] = &jobCount{}
		}
		return out.Counts[k]
	}
	root := s.subj.Root()
	jobs, err := s.js.Stream(ctx, s.streamName("JOBS"))
	if err != nil {
		return out
	}
	out.Available = true
	if info, err := jobs.Info(ctx, jetstream.WithSubjectFilter(root+".job.>")); err == nil {
		for subj, n := range info.State.Subjects {
			if pool, fn, ok := poolFunction(subj, root+".job."); ok {
				count(pool, fn).Pending += int(n)
			}
		}
	}
	for _, st := range live {
		if st.State == protocol.JobRunning && st.Function != "" {
			c := count(st.Pool, st.Function)
			c.Running++
			// A running job is still in the work-queue stream until acked.
			c.Pending = max(c.Pending-1, 0)
		}
	}
	dead, err := s.js.Stream(ctx, s.streamName("DEAD"))
	if err != nil {
		return out
	}
	info, err := dead.Info(ctx, jetstream.WithSubjectFilter(root+".dead.>"))
	if err != nil {
		return out
	}
	for subj, n := range info.State.Subjects {
		if pool, fn, ok := poolFunction(subj, root+".dead."); ok {
			count(pool, fn).Dead += int(n)
		}
	}
	// The latest dead letters, newest first; the tries are bounded too, for
	// a stream whose latest letters were mostly requeued or discarded.
	tries := 0
	for seq := info.State.LastSeq; seq >= info.State.FirstSeq && seq > 0 && len(out.Dead) < maxDead && tries < 5*maxDead; seq-- {
		tries++
		m, err := dead.GetMsg(ctx, seq)
		if err != nil {
			continue // deleted (discarded or requeued)
		}
		d := deadLetter{Seq: seq, Time: m.Time}
		d.Pool, d.Function, _ = poolFunction(m.Subject, root+".dead.")
		_ = json.Unmarshal(m.Data, &d.Letter)
		out.Dead = append(out.Dead, d)
	}
	return out
}

func poolFunction(subj, prefix string) (string, string, bool) {
	rest, ok := strings.CutPrefix(subj, prefix)
	if !ok {
		return "", "", false
	}
	return strings.Cut(rest, ".")
}

// maxPoolClients bounds clientFor's clients, one per pool acted on.
const maxPoolClients = 64

// clientFor returns a client of pool on the same connection, for the
// actions on jobs that take one.
func (s *Server) clientFor(pool string) (*client.Client, error) {
	s.clientsMu.Lock()
	defer s.clientsMu.Unlock()
	if c := s.clients[pool]; c != nil {
		return c, nil
	}
	// The pool comes from the action's body: the clients kept are bounded
	// like everything else a page's requests can grow.
	if len(s.clients) >= maxPoolClients {
		return nil, fmt.Errorf("actions on more than %d pools: restart submit ui", maxPoolClients)
	}
	c, err := client.New(s.nc, client.Options{Pool: pool, Prefix: s.subj.Prefix})
	if err != nil {
		return nil, err
	}
	s.clients[pool] = c
	return c, nil
}

// actionRequest is the body of POST /api/action.
type actionRequest struct {
	Action string `json:"action"` // requeue, discard, cancel, recycle, drain
	Seq    uint64 `json:"seq,omitempty"`
	Pool   string `json:"pool,omitempty"`
	Node   string `json:"node,omitempty"`
	Worker string `json:"worker,omitempty"`
	Job    string `json:"job,omitempty"`
}

func (s *Server) action(w http.ResponseWriter, r *http.Request) {
	if !s.cfg.Actions {
		http.Error(w, "actions are off: start submit ui with --actions", http.StatusForbidden)
		return
	}
	// A JSON body only: a cross-site form cannot send one without the
	// browser asking this server first, which it does not allow.
	if !strings.HasPrefix(r.Header.Get("Content-Type"), "application/json") {
		http.Error(w, "want Content-Type: application/json", http.StatusUnsupportedMediaType)
		return
	}
	var req actionRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<16)).Decode(&req); err != nil {
		http.Error(w, "bad action: "+err.Error(), http.StatusBadRequest)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
	defer cancel()
	target, result, err := s.do(ctx, req, r.RemoteAddr)
	rec := actionRecord{TS: time.Now().UTC(), By: r.RemoteAddr, Action: req.Action, Target: target}
	if err != nil {
		rec.Error = err.Error()
	}
	s.log.Printf("ui: action %s %s by %s: %s", req.Action, target, r.RemoteAddr, orOK(err))
	s.mu.Lock()
	s.actions = append(s.actions, rec)
	if len(s.actions) > 100 {
		s.actions = s.actions[len(s.actions)-100:]
	}
	s.touch()
	s.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	if err != nil {
		w.WriteHeader(http.StatusBadRequest)
	}
	_ = json.NewEncoder(w).Encode(map[string]any{"ok": err == nil, "error": rec.Error, "result": result})
}

func orOK(err error) string {
	if err != nil {
		return err.Error()
	}
	return "ok"
}

func (s *Server) do(ctx context.Context, req actionRequest, by string) (target string, result any, err error) {
	switch req.Action {
	case "recycle":
		c, err := s.clientFor(req.Pool)
		if err != nil {
			return "", nil, err
		}
		return req.Pool + "/" + req.Node + "/" + req.Worker, nil, c.Recycle(ctx, req.Pool, req.Node, req.Worker, "submit ui, "+by)
	case "drain":
		c, err := s.clientFor(req.Pool)
		if err != nil {
			return "", nil, err
		}
		return req.Pool + "/" + req.Node, nil, c.Drain(ctx, req.Pool, req.Node, "submit ui, "+by)
	case "cancel":
		c, err := s.clientFor(req.Pool)
		if err != nil {
			return "", nil, err
		}
		ended, err := c.Job(req.Job).Cancel(ctx)
		return req.Pool + "/" + req.Job, map[string]bool{"already_ended": ended}, err
	case "requeue", "discard":
		return s.deadAction(ctx, req)
	}
	return "", nil, fmt.Errorf("unknown action %q: want requeue, discard, cancel, recycle or drain", req.Action)
}

// deadAction requeues (submits again, as a new job of the same function
// with the same payload) or discards dead letter req.Seq; either way the
// dead letter is deleted, so it is handled once.
func (s *Server) deadAction(ctx context.Context, req actionRequest) (string, any, error) {
	target := fmt.Sprintf("dead letter %d", req.Seq)
	dead, err := s.js.Stream(ctx, s.streamName("DEAD"))
	if err != nil {
		return target, nil, err
	}
	m, err := dead.GetMsg(ctx, req.Seq)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return target, nil, fmt.Errorf("%s is gone (requeued or discarded already?)", target)
	}
	if err != nil {
		return target, nil, err
	}
	pool, fn, ok := poolFunction(m.Subject, s.subj.Root()+".dead.")
	if !ok {
		return target, nil, fmt.Errorf("%s: subject %s is not a dead letter's", target, m.Subject)
	}
	target += " (" + pool + "/" + fn + ")"
	var result any
	if req.Action == "requeue" {
		var dl protocol.DeadLetter
		if err := json.Unmarshal(m.Data, &dl); err != nil {
			return target, nil, fmt.Errorf("%s: %w", target, err)
		}
		if dl.Job.PayloadTruncated {
			return target, nil, fmt.Errorf("%s: its payload was cut short when it was stored; it cannot be run again", target)
		}
		var payload any = []byte(dl.Job.PayloadBytes)
		if len(dl.Job.Payload) > 0 {
			payload = json.RawMessage(dl.Job.Payload)
		}
		c, err := s.clientFor(pool)
		if err != nil {
			return target, nil, err
		}
		j, err := c.Submit(ctx, fn, payload)
		if err != nil {
			return target, nil, err
		}
		result = map[string]string{"job": j.ID}
		target += " as job " + j.ID
	}
	if err := dead.DeleteMsg(ctx, req.Seq); err != nil {
		return target, result, fmt.Errorf("%s: delete: %w", target, err)
	}
	return target, result, nil
}
