package node

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// Where the interpreter came from, in the order they are tried (README.md,
// "Your own app in five minutes"). The name goes into the start-up log and
// into every error about the interpreter.
const (
	PythonFromFlag       = "--python"
	PythonFromVirtualEnv = "$VIRTUAL_ENV"
	PythonFromRepo       = "the pyfleet repo's python/.venv"
	PythonFromPath       = "python3 on PATH"
)

// pythonEnv is what choosePython reads from the process, passed in so the
// tests can give each rule its turn.
type pythonEnv struct {
	getenv   func(string) string
	exe      string // this binary's path, symlinks resolved
	cwd      string
	lookPath func(string) (string, error)
}

func processPythonEnv() pythonEnv {
	exe, err := os.Executable()
	if err == nil {
		if real, err := filepath.EvalSymlinks(exe); err == nil {
			exe = real
		}
	}
	cwd, _ := os.Getwd()
	return pythonEnv{getenv: os.Getenv, exe: exe, cwd: cwd, lookPath: exec.LookPath}
}

// choosePython picks the interpreter: --python, else the active virtual
// env's, else the venv of the pyfleet repo this runs from, else python3 on
// PATH. It returns the interpreter as found (not yet resolved) and the rule
// that chose it.
func choosePython(flag string, env pythonEnv) (string, string) {
	if flag != "" {
		return flag, PythonFromFlag
	}
	if venv := env.getenv("VIRTUAL_ENV"); venv != "" {
		return filepath.Join(venv, "bin", "python"), PythonFromVirtualEnv
	}
	for _, repo := range repoRoots(env) {
		py := filepath.Join(repo, "python", ".venv", "bin", "python")
		if _, err := os.Stat(py); err == nil {
			return py, PythonFromRepo
		}
	}
	return "python3", PythonFromPath
}

// repoRoots are the pyfleet checkouts this node runs from, best first: the
// one whose bin/ holds this binary (its runtime matches the binary), then
// the one holding the working directory, at any depth.
func repoRoots(env pythonEnv) []string {
	var roots []string
	if env.exe != "" {
		if root := filepath.Dir(filepath.Dir(env.exe)); isRepoRoot(root) {
			roots = append(roots, root)
		}
	}
	for dir := env.cwd; dir != "" && filepath.IsAbs(dir); {
		if isRepoRoot(dir) {
			if len(roots) == 0 || roots[0] != dir {
				roots = append(roots, dir)
			}
			break
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			break
		}
		dir = parent
	}
	return roots
}

// isRepoRoot reports whether dir is a pyfleet checkout: its worker runtime
// is at python/pyfleet, with the pyproject that installs it.
func isRepoRoot(dir string) bool {
	for _, f := range []string{"go.mod", "python/pyproject.toml", "python/pyfleet/__init__.py"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			return false
		}
	}
	return true
}

// probeTimeout bounds the one interpreter start Validate makes; an import
// that takes longer is broken, not slow.
const probeTimeout = 60 * time.Second

// probeScript prints what the node needs to know, then imports what a
// worker imports: a runtime missing a dependency (grpcio) fails here, with
// its own error, rather than as a crash loop of workers.
const probeScript = `import sys
print(sys.executable)
print(int(sys.prefix != sys.base_prefix))
sys.stdout.flush()
import pyfleet.worker
`

// probe is what the interpreter said about itself.
type probe struct {
	executable string // sys.executable: the real interpreter behind a shim
	inVenv     bool
}

// probePython starts the interpreter once, as a worker would be started
// (same directory, same environment), and checks that it imports pyfleet.
func probePython(ctx context.Context, python, dir string) (probe, error) {
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, python, "-c", probeScript)
	cmd.Dir = dir
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	var p probe
	if len(lines) >= 2 {
		p = probe{executable: lines[0], inVenv: lines[1] == "1"}
	}
	if err != nil {
		if ctx.Err() != nil {
			return p, fmt.Errorf("did not import pyfleet within %s", probeTimeout)
		}
		return p, &importError{why: lastLine(stderr.String(), err)}
	}
	if p.executable == "" {
		return p, errors.New("did not say what it is (sys.executable is empty)")
	}
	return p, nil
}

// importError is an interpreter that runs but cannot import pyfleet.
type importError struct{ why string }

func (e *importError) Error() string { return "cannot import pyfleet.worker: " + e.why }

// lastLine is the last line of a Python traceback: the exception.
func lastLine(stderr string, err error) string {
	lines := strings.Split(strings.TrimSpace(stderr), "\n")
	if last := strings.TrimSpace(lines[len(lines)-1]); last != "" {
		return last
	}
	return err.Error()
}

// isPyenvShim reports whether path is a pyenv shim: a shell script in a
// shims directory that asks pyenv which interpreter to run. Each worker start through it costs
// a bash and a pyenv run (about 80 ms), so the node runs the interpreter
// the shim picks, which the probe reports. A shim of another kind is left
// alone: a wrapper script may set an environment the interpreter needs.
func isPyenvShim(path string) bool {
	if filepath.Base(filepath.Dir(path)) != "shims" {
		return false
	}
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	head := make([]byte, 1024)
	n, _ := f.Read(head)
	head = head[:n]
	return bytes.HasPrefix(head, []byte("#!")) && bytes.Contains(head, []byte("pyenv"))
}

// installHint is the command that puts the worker runtime into python: pip
// from the repo's python/ directory when one is known.
func installHint(python string, p probe, env pythonEnv) string {
	src, note := "/path/to/pyfleet/python", "\n(/path/to/pyfleet/python: the python/ directory of a pyfleet checkout, or a wheel built from it)"
	if roots := repoRoots(env); len(roots) > 0 {
		src, note = filepath.Join(roots[0], "python"), ""
	}
	hint := fmt.Sprintf("install the worker runtime into it with:\n    %s -m pip install %s", python, src)
	if !p.inVenv {
		hint += fmt.Sprintf("\nor into a virtual env of your own:\n    python3 -m venv .venv && . .venv/bin/activate && pip install %s", src)
	}
	return hint + note + "\nor name an interpreter that has it with --python"
}

// importCheck is the interpreter's check (checkPython) running beside the
// node's start (Config.deferImportCheck). Its goroutine is Run's: stop
// ends it.
type importCheck struct {
	cancel context.CancelFunc
	done   chan struct{}
	err    error // valid once done is closed
}

func startImportCheck(check func(context.Context) error) *importCheck {
	ctx, cancel := context.WithCancel(context.Background())
	c := &importCheck{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(c.done)
		c.err = check(ctx)
	}()
	return c
}

// wait returns the check's verdict, or ctx's error if ctx ends first. A nil
// check (made at once, in Validate) has passed.
func (c *importCheck) wait(ctx context.Context) error {
	if c == nil {
		return nil
	}
	select {
	case <-c.done:
		return c.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// stop kills the check's interpreter if it still runs and waits for its
// goroutine.
func (c *importCheck) stop() {
	if c == nil {
		return
	}
	c.cancel()
	<-c.done
}
