package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

type harness struct {
	root, python, tmp, poolnode string
	id                          string // prefix of node names and markers
	ps                          *procs
	res                         *results

	rounds   int
	duration time.Duration
	jobs     int
	big      int      // workers for the start/kill/memory figures
	profile  string   // directory for profiles, or ""
	pyspy    string   // py-spy binary, or ""
	autoMode string   // the containment mode --containment auto chose, once known
	bin      string   // prebuilt poolnode and pyfleet-init, or "" to build them
	pgo      string   // go build's -pgo for poolnode: "auto" uses cmd/poolnode/default.pgo
	nodeEnv  []string // KEY=VALUE added to every node's environment (GOGC, GOMAXPROCS)
}

func main() {
	os.Exit(run())
}

func run() int {
	if len(os.Args) > 1 && os.Args[1] == relayArg {
		return relayMain()
	}
	h := &harness{res: newResults()}
	var sections, out string
	flag.IntVar(&h.rounds, "rounds", 3, "runs of each side of each comparison")
	flag.DurationVar(&h.duration, "duration", 3*time.Second, "length of one throughput or latency run")
	flag.IntVar(&h.jobs, "jobs", 6000, "jobs per jobs run")
	flag.IntVar(&h.big, "big", 100, "workers of the start, kill and memory figures")
	flag.StringVar(&sections, "sections", "rr,c1,jobs,start,contain,client,fnargs,preload", "which figures to measure")
	flag.StringVar(&out, "out", "docs/benchmarks.md", "report file, relative to the repository (empty: none)")
	flag.StringVar(&h.profile, "profile", "", "write a poolnode CPU profile (and worker py-spy profiles with -pyspy) of the first pyfleet run of each kind to this directory")
	flag.StringVar(&h.pyspy, "pyspy", "", "py-spy binary for -profile")
	flag.StringVar(&h.bin, "bin", "", "a directory with poolnode and pyfleet-init already built (another commit's, say) instead of building them")
	flag.StringVar(&h.pgo, "pgo", "auto", "go build -pgo for poolnode: auto (cmd/poolnode/default.pgo), off, or a profile")
	var nodeEnv string
	flag.StringVar(&nodeEnv, "node-env", "", "comma-separated KEY=VALUE added to every node's environment, e.g. GOGC=400")
	flag.Parse()
	if nodeEnv != "" {
		h.nodeEnv = strings.Split(nodeEnv, ",")
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// make bench takes 9 to 10 minutes on 2 cores since the preload
	// section came; past 12, stop cleanly. (At 9.5 a slow spell ran a full
	// run out of time in its last figure, and nothing was written.)
	ctx, cancel := context.WithTimeout(ctx, 12*time.Minute)
	defer cancel()

	var err error
	if h.root, err = repoRoot(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 2
	}
	h.python = os.Getenv("PYFLEET_TEST_PYTHON")
	if h.python == "" {
		h.python = filepath.Join(h.root, "python", ".venv", "bin", "python")
	}
	if h.python, err = filepath.Abs(h.python); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 2
	}
	if h.tmp, err = os.MkdirTemp("", "pyfleet-bench-"); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 2
	}
	defer os.RemoveAll(h.tmp)
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	h.id = "pfb" + hex.EncodeToString(b)
	logs := filepath.Join(h.tmp, "logs")
	_ = os.MkdirAll(logs, 0o700)
	h.ps = &procs{dir: logs}
	if h.profile != "" {
		if h.profile, err = filepath.Abs(h.profile); err == nil {
			err = os.MkdirAll(h.profile, 0o755)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			return 2
		}
	}

	code := 0
	started := time.Now()
	err = h.measure(ctx, strings.Split(sections, ","))
	h.ps.killAll()
	if h.leftovers() {
		code = 1
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		if ctx.Err() != nil {
			fmt.Fprintln(os.Stderr, "bench: interrupted or out of time")
		}
		return 1
	}
	report := h.report(time.Since(started))
	fmt.Print(report)
	if out != "" {
		if !filepath.IsAbs(out) {
			out = filepath.Join(h.root, out)
		}
		if err := os.WriteFile(out, []byte(report), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			return 1
		}
		fmt.Fprintf(os.Stderr, "bench: wrote %s\n", out)
	}
	return code
}

// leftovers kills whatever the harness started that outlived it, and
// reports whether there was any: a leftover is a failing bench.
func (h *harness) leftovers() (found bool) {
	if left := markedPIDs(h.id); len(left) > 0 {
		// Every node and worker the harness started carries a marker
		// beginning with h.id: none may outlive it.
		fmt.Fprintf(os.Stderr, "bench: LEFTOVER processes %v; killing them\n", left)
		for _, pid := range left {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		found = true
	}
	if left := taggedProcs(cleanChildTag + h.id); len(left) > 0 {
		// The workers' clean-environment children carry no marker, but
		// the harness's tag.
		fmt.Fprintf(os.Stderr, "bench: LEFTOVER clean-environment children %v; killing them\n", left)
		killProcs(left, 10*time.Second)
		found = true
	}
	if left := runCgroups(h.id); len(left) > 0 {
		fmt.Fprintf(os.Stderr, "bench: LEFTOVER cgroups %v; removing them\n", left)
		if err := removeCgroups(left); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
		}
		found = true
	}
	return found
}

func (h *harness) measure(ctx context.Context, sections []string) error {
	if err := h.buildNode(ctx); err != nil {
		return err
	}
	for _, s := range sections {
		var err error
		switch strings.TrimSpace(s) {
		case "rr":
			err = h.requestReply(ctx)
		case "c1":
			err = h.oneAtATime(ctx)
		case "jobs":
			err = h.jobsRun(ctx)
		case "start":
			err = h.startKillMemory(ctx)
		case "contain":
			err = h.containment(ctx)
		case "client":
			err = h.clientBench(ctx)
		case "fnargs":
			err = h.fnArgs(ctx)
		case "preload":
			err = h.preloadBench(ctx)
		case "preload-start", "preload-recycle", "preload-pss":
			err = h.preloadBench(ctx, strings.TrimPrefix(strings.TrimSpace(s), "preload-"))
		case "":
		default:
			err = fmt.Errorf("unknown section %q", s)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// buildNode builds poolnode and pyfleet-init (found beside it) into h.tmp,
// or copies them from -bin.
func (h *harness) buildNode(ctx context.Context) error {
	h.poolnode = filepath.Join(h.tmp, "poolnode")
	if h.bin != "" {
		h.logf("poolnode from %s (node environment %q)", h.bin, h.nodeEnv)
		for _, name := range []string{"poolnode", "pyfleet-init"} {
			b, err := os.ReadFile(filepath.Join(h.bin, name))
			if err != nil {
				return fmt.Errorf("-bin: %w", err)
			}
			if err := os.WriteFile(filepath.Join(h.tmp, name), b, 0o755); err != nil {
				return err
			}
		}
		return nil
	}
	h.logf("building poolnode (-pgo=%s; node environment %q)", h.pgo, h.nodeEnv)
	build := exec.CommandContext(ctx, "go", "build", "-pgo="+h.pgo, "-o", h.tmp+"/", "./cmd/poolnode", "./cmd/pyfleet-init")
	build.Dir = h.root
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		return fmt.Errorf("build poolnode: %w", err)
	}
	return nil
}

func (h *harness) logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s bench: %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}

func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("not inside the repository (no go.mod above the working directory)")
		}
		dir = parent
	}
}
