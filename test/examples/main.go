package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("examples", flag.ContinueOnError)
	fs.SetOutput(stderr)
	poolnode := fs.String("poolnode", "bin/poolnode", "poolnode `binary`")
	dir := fs.String("dir", "examples", "the examples' `directory`")
	reduced := fs.Bool("reduced", false, "the test's worker counts (concurrent with 8 workers, not 100)")
	only := fs.String("run", "", "run only the examples whose name matches this `regexp`")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	python := os.Getenv("PYFLEET_TEST_PYTHON")
	if python == "" {
		python = filepath.Join("python", ".venv", "bin", "python")
	}
	filter, err := regexp.Compile(*only)
	if err != nil {
		fmt.Fprintf(stderr, "examples: -run: %v\n", err)
		return 2
	}
	r := runner{poolnode: *poolnode, python: python, dir: *dir, log: stderr}
	failed := false
	fmt.Fprintf(stdout, "%-10s %7s  %-4s  %s\n", "example", "workers", "left", "figure")
	for _, ex := range Examples {
		if !filter.MatchString(ex.Name) {
			continue
		}
		res := r.Run(ex, *reduced)
		fmt.Fprintln(stdout, res.Line())
		if res.Err != nil || res.Left != 0 {
			failed = true
			if res.Output != "" {
				fmt.Fprintf(stderr, "--- %s client output:\n%s\n", ex.Name, res.Output)
			}
		}
	}
	if failed {
		return 1
	}
	return 0
}
