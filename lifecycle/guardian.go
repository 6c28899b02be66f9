package lifecycle

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// GuardianArg, as the first argument, turns the node's own binary into its
// guardian (see StartGuardian); the binary's main must hand over to
// GuardianMain when it sees it.
const GuardianArg = "__pyfleet_guardian"

// Guardian is a small process that outlives its node for one reason: to kill
// every process of the node's run if the node dies without doing it itself
// (SIGKILL, OOM, a crash). The workers' parent-death signals end the workers
// but not what they started with subprocess (fork and exec skip the
// runtime's at-fork hooks), and a worker's own lifeline loses the race
// against its SIGKILL; the guardian is a separate process with nothing to
// lose, so it acts on the node's death within milliseconds. What it misses
// (the guardian itself killed too) the reaper finds when a node next starts
// on the state dir.
type Guardian struct {
	cmd  *exec.Cmd
	w    *os.File // never written; its close is the message
	done chan struct{}
}

// StartGuardian starts the guardian of run m (m.Worker empty): a copy of the
// running binary that reads its stdin until EOF. The node holds the only
// write end, so EOF comes when the node stops it or dies, however it dies.
// The guardian stays in the node's process group (so the node's subreaper
// does not take it for an orphan) and ignores the terminal's signals.
func StartGuardian(m Marker, stateDir string) (*Guardian, error) {
	if m.Worker != "" || !validName(m.Node) || !validName(m.Run) {
		return nil, fmt.Errorf("%w: a guardian keeps a whole run, not %+v", ErrInvalidName, m)
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("lifecycle: guardian: %w", err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("lifecycle: guardian: %w", err)
	}
	ready, readyW, err := os.Pipe()
	if err != nil {
		r.Close()
		w.Close()
		return nil, fmt.Errorf("lifecycle: guardian: %w", err)
	}
	defer ready.Close()
	cmd := exec.Command(exe, GuardianArg, m.Node, m.Run, journalPath(stateDir, m))
	cmd.Stdin = r
	cmd.Stdout = readyW
	cmd.Stderr = os.Stderr
	// A node started from inside a worker must not make a guardian that
	// carries (and so would kill) that worker's marks.
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "PYFLEET_WORKER_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	err = cmd.Start()
	r.Close()
	readyW.Close()
	if err != nil {
		w.Close()
		return nil, fmt.Errorf("lifecycle: guardian: %w", err)
	}
	g := &Guardian{cmd: cmd, w: w, done: make(chan struct{})}
	go func() {
		defer close(g.done)
		_ = cmd.Wait()
	}()
	// Until it has set its signals aside, a Ctrl-C would end the guardian
	// with the node; it says when it has, by closing its stdout.
	_ = ready.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.Copy(io.Discard, ready); err != nil {
		g.Stop()
		return nil, fmt.Errorf("lifecycle: guardian did not start: %w", err)
	}
	return g, nil
}

// Stop tells the guardian the node is done; it sweeps once more (finding
// nothing, normally) and exits. Stop waits for it, at most a few seconds.
// Safe to call twice.
func (g *Guardian) Stop() {
	g.w.Close()
	t := time.NewTimer(5 * time.Second)
	defer t.Stop()
	select {
	case <-g.done:
	case <-t.C:
		_ = g.cmd.Process.Kill()
		<-g.done
	}
}

// journalSuffix ends the file in which a guardian records its kills: its
// node, and so the node's NATS connection, is gone, so the next node on the
// state dir publishes them (PublishJournals).
const journalSuffix = ".reaped"

func journalPath(stateDir string, m Marker) string {
	return filepath.Join(nodesDir(stateDir), m.Node+"."+m.Run+journalSuffix)
}

// GuardianMain is the guardian's whole life: args are the node, the run and
// the journal file. It returns the exit status. Each kill is logged to
// stderr and appended to the journal as one JSON lifecycle event.
func GuardianMain(args []string, stdin io.Reader, stderr io.Writer) int {
	if len(args) != 3 {
		fmt.Fprintln(stderr, "usage: "+GuardianArg+" NODE RUN JOURNAL")
		return 2
	}
	// Ctrl-C on a terminal reaches the whole foreground group; the node
	// handles it and tells the guardian by closing its end.
	signal.Ignore(syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	os.Stdout.Close() // ready
	_, _ = io.Copy(io.Discard, stdin)

	m := Marker{Node: args[0], Run: args[1]}
	var journal []byte
	_, err := KillMarked(m, func(e Event) {
		e.Detail = "guardian: the node of run " + m.RunValue() + " is gone; " + e.Detail
		line, _ := json.Marshal(e)
		line = append(line, '\n')
		_, _ = stderr.Write(line)
		journal = append(journal, line...)
	})
	if len(journal) > 0 {
		// Written once, at the end: a partly written journal would be
		// published as a partial one, never as garbage.
		if werr := os.WriteFile(args[2]+".tmp", journal, 0o600); werr == nil {
			_ = os.Rename(args[2]+".tmp", args[2])
		}
	}
	if err != nil && !errors.Is(err, ErrNoProcess) {
		fmt.Fprintf(stderr, "guardian of %s: %v\n", m.RunValue(), err)
		return 1
	}
	return 0
}

// PublishJournals reports, through events, the kills that guardians of dead
// runs recorded in stateDir, and removes their journals. A node calls it at
// start, once it can publish.
func PublishJournals(stateDir string, events Events) (int, error) {
	paths, err := filepath.Glob(filepath.Join(nodesDir(stateDir), "*"+journalSuffix))
	if err != nil {
		return 0, fmt.Errorf("lifecycle: journals: %w", err)
	}
	n := 0
	var errs []error
	for _, path := range paths {
		data, err := os.ReadFile(path)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, line := range bytes.Split(data, []byte("\n")) {
			var e Event
			if len(line) == 0 || json.Unmarshal(line, &e) != nil {
				continue
			}
			emit(events, e)
			n++
		}
		if err := os.Remove(path); err != nil {
			errs = append(errs, err)
		}
	}
	return n, errors.Join(errs...)
}
