package pool

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/pyfleet/pyfleet/lifecycle"
)

// TemplateWorker is the Worker name of the template's events (Config.Preload).
const TemplateWorker = "template"

// preload is the pool's template (Config.Preload): the one serving now, if
// any. Workers fork from it while it serves and start plainly while it does
// not (it died and is being restarted, or preload is off for good).
type preload struct {
	mu  sync.Mutex
	cur *lifecycle.Template
	// reload carries requests for a new template (Pool.Reload); the
	// template's supervisor answers each once the new template serves.
	reload chan chan error
}

func (p *Pool) template() *lifecycle.Template {
	p.pre.mu.Lock()
	defer p.pre.mu.Unlock()
	return p.pre.cur
}

func (p *Pool) setTemplate(t *lifecycle.Template) {
	p.pre.mu.Lock()
	p.pre.cur = t
	p.pre.mu.Unlock()
}

// startPreload starts the template before the first workers, so that they
// fork from it, and its supervisor. Every containment mode preloads (in
// the PID namespace modes each forked worker gets its own namespace and
// init, lifecycle/preload.go). Preload stays off, with one warning saying
// why, where it cannot be done safely: an app that leaves threads running
// after its import, or a Containment that is not one of lifecycle's.
func (p *Pool) startPreload() {
	if !p.cfg.Preload {
		return
	}
	p.pre.reload = make(chan chan error)
	if err := lifecycle.Preloadable(p.cfg.Containment); err != nil {
		p.log.Warn("preload is off: workers start plainly", zap.Error(err))
		return
	}
	t, err := p.startTemplate()
	if errors.Is(err, lifecycle.ErrNotPreloadable) {
		p.log.Warn("preload is off: workers start plainly", zap.Error(err))
		return
	}
	if err != nil {
		p.log.Warn("template failed to start; workers start plainly until it does", zap.Error(err))
	}
	p.setTemplate(t)
	p.goroutines.Add(1)
	go func() {
		defer p.goroutines.Done()
		p.superviseTemplate(t)
	}()
}

// startTemplate starts a template, recorded and contained like a worker
// start, and returns once it serves.
func (p *Pool) startTemplate() (*lifecycle.Template, error) {
	start := TemplateWorker + "-" + strconv.FormatUint(p.spawnSeq.Add(1), 10)
	rec := lifecycle.Record{Node: p.cfg.Node, Run: p.cfg.Run, Worker: start, Pool: p.cfg.Pool, State: lifecycle.StateStarting}
	if err := p.record(rec); err != nil {
		return nil, err
	}
	cmd := exec.Command(p.cfg.Python, "-m", "pyfleet.template", "--app", p.cfg.App, "--app-dir", p.cfg.AppDir,
		// Room for a forked worker's command line, which it writes over
		// the template's (python/pyfleet/template.py, set_cmdline).
		"--argv-room", strings.Repeat("-", 1024))
	cmd.Env = workerEnv(os.Environ())
	cmd.Dir = p.cfg.AppDir
	log := p.log.With(zap.String("worker", start))
	t, err := lifecycle.StartTemplate(p.cfg.Spawner, cmd, lifecycle.StartOptions{
		Stdout:   func(line []byte) { log.Info(string(line), zap.String("stream", "stdout")) },
		Stderr:   func(line []byte) { log.Warn(string(line), zap.String("stream", "stderr")) },
		Marker:   lifecycle.Marker{Node: p.cfg.Node, Run: p.cfg.Run, Worker: start},
		Events:   p.cfg.Events,
		Contain:  p.cfg.Containment,
		Limits:   p.cfg.limits(),
		Guardian: p.cfg.Guardian,
	}, p.cfg.StartTimeout)
	if err != nil {
		p.forget(start)
		return nil, err
	}
	proc := t.Process()
	rec.SetProcess(proc)
	rec.State = lifecycle.StateRunning
	if err := p.record(rec); err != nil {
		p.log.Warn("registry", zap.Error(err))
	}
	p.goroutines.Add(1)
	go func() {
		defer p.goroutines.Done()
		<-proc.Done()
		p.forget(start)
	}()
	p.emit(lifecycle.Event{Kind: lifecycle.KindSpawned, Worker: TemplateWorker, PID: proc.PID(), PGID: proc.PGID(), Detail: "template " + start})
	p.log.Info("template serving: workers fork from it", zap.String("template", start), zap.Int("pid", proc.PID()))
	return t, nil
}

// superviseTemplate keeps a template serving until the pool closes: one
// that dies is restarted (workers start plainly meanwhile), and a reload
// replaces it.
func (p *Pool) superviseTemplate(t *lifecycle.Template) {
	backoff := p.cfg.RestartBackoff
	failures := 0
	grace := func() time.Duration {
		if p.isAborted() {
			return 0
		}
		return p.cfg.StopGrace
	}
	for {
		if t == nil {
			failures++
			if !p.sleepBackoff(TemplateWorker, &backoff, failures) {
				return
			}
			var err error
			if t, err = p.startTemplate(); err != nil {
				p.emit(lifecycle.Event{Kind: lifecycle.KindSpawnFailed, Worker: TemplateWorker, Detail: err.Error()})
				if errors.Is(err, lifecycle.ErrNotPreloadable) {
					p.log.Warn("preload is off: workers start plainly", zap.Error(err))
					return
				}
				continue
			}
			p.setTemplate(t)
			failures, backoff = 0, p.cfg.RestartBackoff
		}
		proc := t.Process()
		select {
		case <-proc.Done():
			p.setTemplate(nil)
			st := proc.Exit()
			p.log.Warn("template died; workers start plainly until a new one serves", zap.String("exit", exitText(st)))
			ev := lifecycle.Event{Kind: lifecycle.KindCrashed, Worker: TemplateWorker, PID: proc.PID(), PGID: proc.PGID(), Signal: st.Signal}
			if st.Signal == "" {
				code := st.Code
				ev.ExitCode = &code
			}
			p.emit(ev)
			t.Stop(0)
			t = nil
		case done := <-p.pre.reload:
			next, err := p.startTemplate()
			if err == nil {
				p.setTemplate(next)
				t.Stop(grace())
				p.reportTemplateStop(t, lifecycle.ReasonRecycle)
				t = next
			}
			done <- err
		case <-p.closed:
			p.setTemplate(nil)
			t.Stop(grace())
			p.reportTemplateStop(t, lifecycle.ReasonStop)
			return
		}
	}
}

func (p *Pool) reportTemplateStop(t *lifecycle.Template, reason string) {
	proc := t.Process()
	p.emit(lifecycle.Event{Kind: lifecycle.KindTerminated, Worker: TemplateWorker, Reason: reason, PID: proc.PID(), PGID: proc.PGID()})
}

// Reload picks up a changed app on disk (SIGHUP): a new template first
// (with Config.Preload), then a rolling recycle of every worker, one at a
// time, each replacement serving before the worker it replaces stops taking
// calls and finishes the ones it has (see replace), so that no call fails.
// A template that cannot start leaves the old one serving and the workers
// alone, and Reload returns why.
func (p *Pool) Reload(ctx context.Context) error {
	if p.pre.reload != nil && p.template() != nil {
		done := make(chan error, 1)
		select {
		case p.pre.reload <- done:
		case <-ctx.Done():
			return ctx.Err()
		case <-p.closed:
			return errors.New("pool: closed")
		}
		select {
		case err := <-done:
			if err != nil {
				return fmt.Errorf("pool: reload: new template: %w", err)
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	p.mu.Lock()
	old := make([]*worker, 0, len(p.workers))
	for _, w := range p.workers {
		old = append(old, w)
	}
	p.mu.Unlock()
	for _, w := range old {
		select {
		case w.recycle <- "reload":
		default: // a recycle is asked for already
		}
		select {
		case <-w.proc.Done():
		case <-ctx.Done():
			return ctx.Err()
		case <-p.closed:
			return errors.New("pool: closed")
		}
	}
	return nil
}
