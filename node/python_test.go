package node

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// testPython is the venv the tests run workers with (make venv).
func testPython(t *testing.T) string {
	t.Helper()
	py := os.Getenv("PYFLEET_TEST_PYTHON")
	if py == "" {
		py, _ = filepath.Abs("../python/.venv/bin/python")
	}
	if _, err := os.Stat(py); err != nil {
		t.Fatalf("no Python venv at %s: run `make venv`", py)
	}
	return py
}

// fakeRepo lays out a pyfleet checkout as isRepoRoot sees one, with a
// python/.venv when venv is not empty: a link to that venv directory, so
// its interpreter really runs (a venv's python finds its packages from
// the directory it is called through).
func fakeRepo(t *testing.T, venv string) string {
	t.Helper()
	root := t.TempDir()
	for _, f := range []string{"go.mod", "python/pyproject.toml", "python/pyfleet/__init__.py"} {
		p := filepath.Join(root, f)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if venv != "" {
		if err := os.Symlink(venv, filepath.Join(root, "python", ".venv")); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func envWith(vars map[string]string, exe, cwd string, path map[string]string) pythonEnv {
	return pythonEnv{
		getenv: func(k string) string { return vars[k] },
		exe:    exe,
		cwd:    cwd,
		lookPath: func(name string) (string, error) {
			if p, ok := path[name]; ok {
				return p, nil
			}
			return "", exec.ErrNotFound
		},
	}
}

// TestChoosePythonOrder: --python, then $VIRTUAL_ENV, then the venv of the
// checkout holding this binary, then of the checkout holding the working
// directory (at any depth), then python3.
func TestChoosePythonOrder(t *testing.T) {
	venv := filepath.Dir(filepath.Dir(testPython(t)))
	binRepo := fakeRepo(t, venv)
	cwdRepo := fakeRepo(t, venv)
	bareRepo := fakeRepo(t, "") // a checkout where make venv has not run
	deep := filepath.Join(cwdRepo, "python", "pyfleet")
	elsewhere := t.TempDir()
	inBin := func(root string) string { return filepath.Join(root, "bin", "poolnode") }
	venvOn := map[string]string{"VIRTUAL_ENV": "/some/venv"}

	cases := []struct {
		name, flag string
		vars       map[string]string
		exe, cwd   string
		want, from string
	}{
		{"flag first", "/my/python", venvOn, inBin(binRepo), cwdRepo, "/my/python", PythonFromFlag},
		{"then VIRTUAL_ENV", "", venvOn, inBin(binRepo), cwdRepo, "/some/venv/bin/python", PythonFromVirtualEnv},
		{"then the binary's checkout", "", nil, inBin(binRepo), cwdRepo, filepath.Join(binRepo, "python/.venv/bin/python"), PythonFromRepo},
		{"then the working directory's checkout", "", nil, inBin(elsewhere), deep, filepath.Join(cwdRepo, "python/.venv/bin/python"), PythonFromRepo},
		{"a checkout with no venv is passed over", "", nil, inBin(bareRepo), deep, filepath.Join(cwdRepo, "python/.venv/bin/python"), PythonFromRepo},
		{"then python3", "", nil, inBin(bareRepo), elsewhere, "python3", PythonFromPath},
		{"outside any checkout", "", nil, inBin(elsewhere), elsewhere, "python3", PythonFromPath},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, from := choosePython(tc.flag, envWith(tc.vars, tc.exe, tc.cwd, nil))
			if got != tc.want || from != tc.from {
				t.Errorf("chose %s (%s), want %s (%s)", got, from, tc.want, tc.from)
			}
		})
	}
}

// TestValidateRunsTheChosenInterpreter: each rule's interpreter is really
// started and kept once it imports pyfleet.
func TestValidateRunsTheChosenInterpreter(t *testing.T) {
	py := testPython(t)
	venv := filepath.Dir(filepath.Dir(py))
	repo := fakeRepo(t, venv)
	elsewhere := t.TempDir()
	cases := []struct {
		name, flag string
		vars       map[string]string
		exe        string
		path       map[string]string
		want, from string
	}{
		{"--python", py, nil, "", nil, py, PythonFromFlag},
		{"$VIRTUAL_ENV", "", map[string]string{"VIRTUAL_ENV": venv}, "", nil, filepath.Join(venv, "bin", "python"), PythonFromVirtualEnv},
		{"repo venv", "", nil, filepath.Join(repo, "bin", "poolnode"), nil, filepath.Join(repo, "python", ".venv", "bin", "python"), PythonFromRepo},
		{"python3 on PATH", "", nil, "", map[string]string{"python3": py}, py, PythonFromPath},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := validConfig(t)
			c.Python = tc.flag
			if err := c.validateAppIn(envWith(tc.vars, tc.exe, elsewhere, tc.path)); err != nil {
				t.Fatal(err)
			}
			if c.Python != tc.want || c.PythonFrom != tc.from {
				t.Errorf("python %s (%s), want %s (%s)", c.Python, c.PythonFrom, tc.want, tc.from)
			}
		})
	}
}

// TestValidateResolvesPyenvShim: a pyenv shim is replaced by the
// interpreter it runs, so workers do not pay for the shim at each start.
func TestValidateResolvesPyenvShim(t *testing.T) {
	py := testPython(t)
	shims := filepath.Join(t.TempDir(), "shims")
	if err := os.Mkdir(shims, 0o755); err != nil {
		t.Fatal(err)
	}
	shim := filepath.Join(shims, "python3")
	script := "#!/bin/sh\n# stands in for a pyenv shim: pyenv picks the interpreter, then\nexec \"" + py + "\" \"$@\"\n"
	if err := os.WriteFile(shim, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	c := validConfig(t)
	c.Python = ""
	if err := c.validateAppIn(envWith(nil, "", t.TempDir(), map[string]string{"python3": shim})); err != nil {
		t.Fatal(err)
	}
	if c.Python != py || c.PythonFrom != PythonFromPath {
		t.Errorf("python %s (%s), want the shim's interpreter %s (%s)", c.Python, c.PythonFrom, py, PythonFromPath)
	}

	// Any other wrapper script is kept: it may set what its interpreter needs.
	wrapper := filepath.Join(shims, "python")
	if err := os.WriteFile(wrapper, []byte("#!/bin/sh\nexec \""+py+"\" \"$@\"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	c = validConfig(t)
	c.Python = wrapper
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if c.Python != wrapper {
		t.Errorf("python %s, want the wrapper %s kept", c.Python, wrapper)
	}
}

// TestValidateInterpreterWithoutPyfleet: an interpreter that cannot import
// pyfleet is a configuration error that says which interpreter, why it was
// chosen, and the exact command that fixes it.
func TestValidateInterpreterWithoutPyfleet(t *testing.T) {
	venv := filepath.Join(t.TempDir(), "venv")
	if out, err := exec.Command(testPython(t), "-m", "venv", "--without-pip", venv).CombinedOutput(); err != nil {
		t.Fatalf("python -m venv: %v\n%s", err, out)
	}
	bare := filepath.Join(venv, "bin", "python")
	repo, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}

	c := validConfig(t)
	c.Python = ""
	err = c.validateAppIn(envWith(map[string]string{"VIRTUAL_ENV": venv}, "", filepath.Join(repo, "node"), nil))
	if !errors.Is(err, ErrConfig) {
		t.Fatalf("err %v, want ErrConfig", err)
	}
	for _, want := range []string{
		bare + " ($VIRTUAL_ENV) cannot import pyfleet.worker: ModuleNotFoundError: No module named 'pyfleet'",
		"\n    " + bare + " -m pip install " + filepath.Join(repo, "python") + "\n",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q\ndoes not say %q", err, want)
		}
	}
	if strings.Contains(err.Error(), "python3 -m venv") {
		t.Errorf("error %q offers a venv to an interpreter that is in one", err)
	}

	// Outside a checkout, the source to install is a placeholder, explained.
	c = validConfig(t)
	c.Python = bare
	err = c.validateAppIn(envWith(nil, "", t.TempDir(), nil))
	if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), bare+" -m pip install /path/to/pyfleet/python\n") ||
		!strings.Contains(err.Error(), "the python/ directory of a pyfleet checkout, or a wheel built from it") {
		t.Errorf("err %v, want the pip command with an explained placeholder", err)
	}
}

// TestValidateDefaultAppNeedsACheckout: with no --app the demo app is the
// checkout's; outside one, --app is asked for by name.
func TestValidateDefaultAppNeedsACheckout(t *testing.T) {
	repo, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	c := validConfig(t)
	c.App = ""
	if err := c.validateAppIn(envWith(nil, "", filepath.Join(repo, "test"), nil)); err != nil {
		t.Fatal(err)
	}
	if c.App != "demo" || c.AppDir != filepath.Join(repo, "python", "examples") {
		t.Errorf("app %s in %s, want demo in the checkout's python/examples", c.App, c.AppDir)
	}
	c = validConfig(t)
	c.App = ""
	if err := c.validateAppIn(envWith(nil, "", t.TempDir(), nil)); !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), "--app is required") {
		t.Errorf("err %v, want --app is required", err)
	}
}
