package test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pyfleet/pyfleet/lifecycle"
)

// TestOwnAppInterpreterWithoutPyfleetExits2: a node in an app's directory
// whose virtual env lacks the runtime exits 2 with the pip command to run;
// from inside the checkout, the command names the checkout's python/. With
// --preload the interpreter is checked beside the template's start, and the
// answer is the same, with nothing of the run left.
func TestOwnAppInterpreterWithoutPyfleetExits2(t *testing.T) {
	venv := filepath.Join(t.TempDir(), "venv")
	if out, err := exec.Command(python, "-m", "venv", "--without-pip", venv).CombinedOutput(); err != nil {
		t.Fatalf("python -m venv: %v\n%s", err, out)
	}
	bare := filepath.Join(venv, "bin", "python")
	appDir := writeTasksApp(t)
	cases := []struct {
		name, dir, app, source string
		extra                  []string
	}{
		{"outside a checkout", appDir, "./tasks.py", "/path/to/pyfleet/python\n", nil},
		{"inside the checkout", filepath.Join(repoRoot, "test"), filepath.Join(appDir, "tasks.py"), filepath.Join(repoRoot, "python") + "\n", nil},
		{"preloaded", appDir, "./tasks.py", "/path/to/pyfleet/python\n", []string{"--preload", "--node", "nopyfleet-pre"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"--app", tc.app, "--listen", "127.0.0.1:0",
				"--state-dir", shortTempDir(t), "--log-format", "json"}, tc.extra...)
			cmd := exec.Command(poolnodeBin, args...)
			cmd.Dir = tc.dir
			cmd.Env = append(os.Environ(), "VIRTUAL_ENV="+venv)
			stderr := runToExit(t, cmd, 30*time.Second)
			if code := cmd.ProcessState.ExitCode(); code != 2 {
				t.Errorf("exit %d, want 2\n%s", code, stderr)
			}
			for _, want := range []string{
				"poolnode: bad configuration: --python: " + bare + " ($VIRTUAL_ENV) cannot import pyfleet.worker: ModuleNotFoundError: No module named 'pyfleet'\n",
				"\n    " + bare + " -m pip install " + tc.source,
			} {
				if !strings.Contains(stderr, want) {
					t.Errorf("stderr does not say %q:\n%s", want, stderr)
				}
			}
			if tc.extra != nil {
				if left := markedProcesses(lifecycle.EnvWorkerRun + "=nopyfleet-pre/"); len(left) > 0 {
					killIdentities(left)
					t.Errorf("processes of the node left after its exit: %s", describe(left))
				}
			}
		})
	}
}

// TestOwnAppFromAnyDirectory: with no --python, a node started in an app's
// directory outside the checkout runs python3 from PATH, and one started
// inside the checkout runs the checkout's venv; each says which in its log
// and serves the app.
func TestOwnAppFromAnyDirectory(t *testing.T) {
	appDir := writeTasksApp(t)
	// A PATH whose python3 is the test venv's, reached through a link to
	// the venv's directory so that it finds the venv's packages.
	venvLink := filepath.Join(t.TempDir(), "venv")
	if err := os.Symlink(filepath.Dir(filepath.Dir(python)), venvLink); err != nil {
		t.Fatal(err)
	}
	onPath := filepath.Join(venvLink, "bin", "python3")
	repoVenv := filepath.Join(repoRoot, "python", ".venv", "bin", "python")
	if _, err := os.Stat(repoVenv); err != nil {
		t.Fatalf("no venv in the checkout: run make venv: %v", err)
	}
	cases := []struct {
		name, dir, app string
		env            []string
		python, from   string
	}{
		{"python3 on PATH", appDir, "./tasks.py",
			[]string{"VIRTUAL_ENV=", "PATH=" + filepath.Dir(onPath) + ":" + os.Getenv("PATH")}, onPath, "python3 on PATH"},
		{"the checkout's venv", filepath.Join(repoRoot, "test", "apps"), filepath.Join(appDir, "tasks.py"),
			[]string{"VIRTUAL_ENV="}, repoVenv, "the pyfleet repo's python/.venv"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			n := startNode(t, nodeOptions{app: tc.app, dir: tc.dir, env: tc.env, noPython: true})
			if !n.hasLog("interpreter", map[string]string{"python": tc.python, "from": tc.from, "app": "tasks", "app_dir": appDir}) {
				t.Errorf("no interpreter log with python %s from %s\n%s", tc.python, tc.from, n.log())
			}
			msg, err := n.connect().Request("pyfleet.req.default.add", []byte(`{"a":2,"b":3}`), 30*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if string(msg.Data) != "5" {
				t.Errorf("add answered %q, want 5", msg.Data)
			}
			n.signal(syscall.SIGTERM)
			if code := n.wait(30 * time.Second); code != 0 {
				t.Errorf("exit %d, want 0", code)
			}
		})
	}
}

// TestReadmeOwnApp runs README.md's "Your own app in five minutes", read
// from between its markers so the two cannot drift: the first block in one
// bash, which then runs the second (the node) as the README says, in the
// same shell; each line of the third in a shell of its own, its output
// checked against the line's "# output" comment; then Ctrl-C (SIGINT to
// the shell's process group, as a terminal sends it). The only changes:
// PYFLEET is a checkout made of this tree (the binaries under test, a copy
// of python/), and the node's port, state dir and name are the test's own,
// through the environment (PYFLEET_LISTEN, XDG_STATE_HOME, PYFLEET_NODE,
// NATS_URL), so it cannot collide with another run.
func TestReadmeOwnApp(t *testing.T) {
	blocks := readmeBlocks(t, "own-app")
	if len(blocks) != 3 {
		t.Fatalf("README own-app section has %d sh blocks, want 3 (setup, node, calls)", len(blocks))
	}
	checkout := fakeCheckout(t)
	setup := regexp.MustCompile(`(?m)^export PYFLEET=.*$`).ReplaceAllString(blocks[0], "export PYFLEET="+checkout)
	if setup == blocks[0] {
		t.Fatal("the README's first block does not export PYFLEET=")
	}
	work := t.TempDir()
	nodeName := fmt.Sprintf("readme%d", os.Getpid())
	env := append(os.Environ(), "VIRTUAL_ENV=", "PYFLEET_LISTEN=127.0.0.1:0", "PYFLEET_NODE="+nodeName,
		"PYFLEET_LOG_FORMAT=json", "XDG_STATE_HOME="+shortTempDir(t))

	shell := exec.Command("bash", "-c", "set -e\n"+setup+"\n"+blocks[1])
	shell.Dir = work
	shell.Env = env
	shell.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var setupOut bytes.Buffer
	shell.Stdout = &setupOut
	stderr, err := shell.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := shell.Start(); err != nil {
		t.Fatal(err)
	}
	pgid := shell.Process.Pid
	lines := make(chan map[string]any)
	var rawLog bytes.Buffer
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		defer close(lines)
		sc := bufio.NewScanner(io.TeeReader(stderr, &rawLog))
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			var e map[string]any
			if json.Unmarshal(sc.Bytes(), &e) == nil {
				lines <- e
			}
		}
	}()
	exited := make(chan struct{})
	go func() {
		<-readDone
		_ = shell.Wait()
		close(exited)
	}()
	t.Cleanup(func() {
		select {
		case <-exited:
		default:
			_ = syscall.Kill(-pgid, syscall.SIGKILL)
			for range lines {
			}
			<-exited
		}
		if left := markedProcesses("PYFLEET_WORKER_RUN=" + nodeName + "/"); len(left) > 0 {
			for _, id := range left {
				_ = syscall.Kill(id.PID, syscall.SIGKILL)
			}
			t.Errorf("the README's node left %d processes: %v", len(left), left)
		}
		if t.Failed() {
			t.Logf("setup output:\n%s\nnode log:\n%s", setupOut.String(), rawLog.String())
		}
	})

	// pip install fetches grpcio: minutes on a slow network.
	var url string
	deadline := time.After(5 * time.Minute)
	for serving := false; !serving; {
		select {
		case e, ok := <-lines:
			if !ok {
				<-exited
				t.Fatalf("the shell exited before the node served: %v", shell.ProcessState)
			}
			switch {
			case e["msg"] == "embedded NATS server listening":
				url, _ = e["url"].(string)
			case e["msg"] == "interpreter":
				want := filepath.Join(work, "myapp", ".venv", "bin", "python")
				if e["python"] != want || e["from"] != "$VIRTUAL_ENV" {
					t.Errorf("interpreter %v from %v, want %s from $VIRTUAL_ENV", e["python"], e["from"], want)
				}
			case e["msg"] == "serving" && e["logger"] == nil:
				serving = true
			}
		case <-deadline:
			t.Fatal("the README's node was not serving after 5 minutes")
		}
	}
	go func() { // keep the node's stderr flowing
		for range lines {
		}
	}()

	for _, line := range strings.Split(strings.TrimSpace(blocks[2]), "\n") {
		cmdText, want, ok := strings.Cut(line, "#")
		if !ok {
			t.Fatalf("README call %q has no # output to check", line)
		}
		cmd := exec.Command("bash", "-c", cmdText)
		cmd.Env = append(os.Environ(), "PYFLEET="+checkout, "NATS_URL="+url)
		out, _ := cmd.CombinedOutput() // an error call exits 1 by design
		if got := strings.TrimSpace(string(out)); got != strings.TrimSpace(want) {
			t.Errorf("%s\n got %q\nwant %q", strings.TrimSpace(cmdText), got, strings.TrimSpace(want))
		}
	}

	if err := syscall.Kill(-pgid, syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	select {
	case <-exited:
	case <-time.After(60 * time.Second):
		t.Fatal("the README's node did not stop within 60 s of Ctrl-C")
	}
	if code := shell.ProcessState.ExitCode(); code != 0 {
		t.Errorf("the shell running the node exited %d after Ctrl-C, want 0", code)
	}
}

// readmeBlocks returns the ```sh blocks of README.md between
// <!-- name:begin --> and <!-- name:end -->.
func readmeBlocks(t *testing.T, name string) []string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(repoRoot, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(data), "<!-- "+name+":begin -->")
	section, _, ok2 := strings.Cut(rest, "<!-- "+name+":end -->")
	if !ok || !ok2 {
		t.Fatalf("README.md has no %s section between markers", name)
	}
	var blocks []string
	for _, m := range regexp.MustCompile("(?s)```sh\n(.*?)```").FindAllStringSubmatch(section, -1) {
		blocks = append(blocks, m[1])
	}
	return blocks
}

// fakeCheckout is a pyfleet checkout as the README's reader has one, made
// of what is under test: bin/ links to the binaries, python/ a copy of the
// runtime's source (pip builds in the tree it installs from).
func fakeCheckout(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	if err := os.Mkdir(filepath.Join(root, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, b := range []string{poolnodeBin, submitBin} {
		if err := os.Symlink(b, filepath.Join(root, "bin", filepath.Base(b))); err != nil {
			t.Fatal(err)
		}
	}
	py := filepath.Join(root, "python")
	if err := os.CopyFS(filepath.Join(py, "pyfleet"), os.DirFS(filepath.Join(repoRoot, "python", "pyfleet"))); err != nil {
		t.Fatal(err)
	}
	src, err := os.ReadFile(filepath.Join(repoRoot, "python", "pyproject.toml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(py, "pyproject.toml"), src, 0o644); err != nil {
		t.Fatal(err)
	}
	return root
}

// writeTasksApp writes a small app, tasks.py, in a temp dir.
func writeTasksApp(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	src := "from pyfleet import App\n\napp = App()\n\n\n@app.function\ndef add(payload):\n    return payload[\"a\"] + payload[\"b\"]\n"
	if err := os.WriteFile(filepath.Join(dir, "tasks.py"), []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// runToExit runs cmd to its end within timeout and returns its stderr.
func runToExit(t *testing.T, cmd *exec.Cmd, timeout time.Duration) string {
	t.Helper()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(timeout):
		_ = cmd.Process.Kill()
		<-done
		t.Fatalf("still running after %s\n%s", timeout, stderr.String())
	}
	return stderr.String()
}
