package test

import (
	"context"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/pyfleet/pyfleet/client"
	"github.com/pyfleet/pyfleet/ui"
)

// chromium finds the browser the UI test drives, or fails the test saying
// how to get one: the test is part of the suite, not optional.
func chromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{os.Getenv("PYFLEET_TEST_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"} {
		if name == "" {
			continue
		}
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	t.Fatal("no chromium found for the browser test of `submit ui`: install Debian's package " +
		"(`sudo apt-get install chromium`, which `make tools` does when run as root), " +
		"or point PYFLEET_TEST_CHROMIUM at a Chromium or Chrome binary")
	return ""
}

// uiPage starts the ui server of pkg ui on cl (actions on) and a headless
// Chromium on its page; both stop at the test's cleanup.
func uiPage(t *testing.T, cl *client.Client) (context.Context, string) {
	t.Helper()
	srv, err := ui.New(ui.Config{Client: cl, Actions: true, Log: log.New(io.Discard, "", 0)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		srv.Run(ctx)
	}()
	hs := httptest.NewUnstartedServer(srv.Handler())
	hs.Start()
	t.Cleanup(func() {
		cancel()
		hs.CloseClientConnections()
		hs.Close()
		wg.Wait()
	})
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromium(t)),
		chromedp.NoSandbox, // the suite runs as root; the page is ours
		chromedp.WindowSize(1400, 1100),
		chromedp.UserDataDir(t.TempDir()),
	)
	actx, acancel := chromedp.NewExecAllocator(context.Background(), opts...)
	bctx, bcancel := chromedp.NewContext(actx)
	// Cancelling the allocator's context kills the browser and waits for it.
	t.Cleanup(func() { bcancel(); acancel() })
	if _, err := chromedp.Run(bctx, chromedp.Navigate(hs.URL)); err != nil {
		t.Fatal(err)
	}
	return bctx, hs.URL
}

// waitJS polls expr (JavaScript, a boolean) on the page until it is true
// or timeout passes, and returns how long it took.
func waitJS(t *testing.T, ctx context.Context, timeout time.Duration, what, expr string) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		ok, err := chromedp.Run(ctx, chromedp.Evaluate[bool]("!!("+expr+")"))
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if ok {
			return time.Since(start)
		}
		if time.Since(start) > timeout {
			body, _ := chromedp.Run(ctx, chromedp.Evaluate[string](`document.querySelector("main").innerText.slice(0, 4000)`))
			t.Fatalf("page never showed %s within %s; it shows:\n%s", what, timeout, body)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func jsInt(t *testing.T, ctx context.Context, expr string) int {
	t.Helper()
	s, err := chromedp.Run(ctx, chromedp.Evaluate[string](expr))
	if err != nil {
		t.Fatalf("%s: %v", expr, err)
	}
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatalf("%s = %q: %v", expr, s, err)
	}
	return n
}

// TestUIBrowser drives the page of `submit ui` in a real Chromium against
// two real nodes: both listed; a killed worker shows crashed, then
// restarted; a call moves its function's counter; requeueing a dead letter
// from the page runs the job; a stopped node shows gone.
func TestUIBrowser(t *testing.T) {
	a := startNode(t, nodeOptions{app: jobsApp(), workers: 2, extra: []string{"--max-deliver", "1"}})
	b := startNode(t, nodeOptions{app: jobsApp(), workers: 1, extra: []string{"--nats", a.url, "--max-deliver", "1"}})
	cl, err := client.Connect(a.url, client.Options{Pool: "default"})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	page, url := uiPage(t, cl)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	up := func(n *nodeProc) string {
		return fmt.Sprintf(`!!document.querySelector('tr[data-node="default/%s"][data-state="up"]')`, n.name)
	}
	waitJS(t, page, 30*time.Second, "both nodes up", up(a)+" && "+up(b))
	waitJS(t, page, 30*time.Second, "node a's two workers", fmt.Sprintf(`document.querySelectorAll('tr[data-worker^="default/%s/"]').length == 2`, a.name))

	// A call moves the function's counter.
	calls := func() string {
		return `(document.querySelector('[data-calls="echo"]') || {textContent: "0"}).textContent`
	}
	before := jsInt(t, page, calls())
	if err := cl.Call(ctx, "echo", map[string]int{"x": 1}, nil); err != nil {
		t.Fatal(err)
	}
	lag := waitJS(t, page, 30*time.Second, "the echo counter move", fmt.Sprintf(`Number(%s) == %d`, calls(), before+1))
	t.Logf("call counted on the page %s after its answer", lag.Round(time.Millisecond))

	// Kill a worker of node a: the page shows it crashed, then restarted.
	w1 := fmt.Sprintf(`document.querySelector('tr[data-worker="default/%s/w1"]')`, a.name)
	pid := jsInt(t, page, w1+`.dataset.pid`)
	killed := time.Now()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill worker pid %d shown on the page: %v", pid, err)
	}
	ev := func(kind string) string {
		return fmt.Sprintf(`document.querySelector('#events li[data-kind="%s"][data-node="%s"][data-worker="w1"]')`, kind, a.name)
	}
	crashed := waitJS(t, page, 30*time.Second, "crashed", "!!"+ev("crashed"))
	restarted := waitJS(t, page, 60*time.Second, "restarted after crashed",
		// Newest first: restarted above crashed.
		fmt.Sprintf(`!!%s && !!%s && (%s.compareDocumentPosition(%s) & Node.DOCUMENT_POSITION_FOLLOWING) > 0`,
			ev("restarted"), ev("crashed"), ev("restarted"), ev("crashed")))
	waitJS(t, page, 30*time.Second, "w1's new pid", fmt.Sprintf(`%s && %s.dataset.pid != "%d"`, w1, w1, pid))
	t.Logf("kill → crashed on the page %s, → restarted %s", crashed.Round(time.Millisecond), (crashed + restarted).Round(time.Millisecond))
	_ = killed

	// A job that fails its one delivery is dead-lettered; requeued from the
	// page, it runs again and succeeds (flaky fails only its first run).
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	job, err := cl.Submit(ctx, "flaky", map[string]any{"key": "ui", "fails": 1, "dir": dir})
	if err != nil {
		t.Fatal(err)
	}
	deadRow := fmt.Sprintf(`[...document.querySelectorAll('#dead tr')].find((r) => r.textContent.includes(%q))`, job.ID)
	waitJS(t, page, 60*time.Second, "the dead letter of job "+job.ID, "!!"+deadRow)
	if _, err := chromedp.Run(page, chromedp.Evaluate[bool]("("+deadRow+`.querySelector('button[data-act="requeue"]').click(), true)`)); err != nil {
		t.Fatal(err)
	}
	waitJS(t, page, 30*time.Second, "the dead letter gone after requeue", "!"+deadRow)
	runs := func() int {
		b, _ := os.ReadFile(filepath.Join(dir, "flaky-ui"))
		n := 0
		for _, c := range b {
			if c == '\n' {
				n++
			}
		}
		return n
	}
	deadline := time.Now().Add(60 * time.Second)
	for runs() < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("requeued job never ran: %d run(s)", runs())
		}
		time.Sleep(100 * time.Millisecond)
	}
	waitJS(t, page, 10*time.Second, "the requeue in the actions log",
		`[...document.querySelectorAll('#log li')].some((l) => l.textContent.includes("requeue") && !l.classList.contains("bad"))`)

	// An action must be a JSON POST (a cross-site form cannot send one), and
	// without --actions there is none.
	body := `{"action":"drain","pool":"default","node":"` + a.name + `"}`
	if code := post(t, url, "text/plain", body); code != http.StatusUnsupportedMediaType {
		t.Fatalf("text/plain action: %d", code)
	}
	ro, err := ui.New(ui.Config{Client: cl, Log: log.New(io.Discard, "", 0)})
	if err != nil {
		t.Fatal(err)
	}
	rs := httptest.NewServer(ro.Handler())
	defer rs.Close()
	if code := post(t, rs.URL, "application/json", body); code != http.StatusForbidden {
		t.Fatalf("action without --actions: %d", code)
	}

	// A node that stops is shown gone within a few seconds.
	b.signal(syscall.SIGTERM)
	if code := b.wait(30 * time.Second); code != 0 {
		t.Fatalf("node b exited %d", code)
	}
	gone := waitJS(t, page, 10*time.Second, "node b gone",
		fmt.Sprintf(`!!document.querySelector('tr[data-node="default/%s"][data-state="gone"]')`, b.name))
	t.Logf("node b shown gone %s after it exited", gone.Round(time.Millisecond))

	// `make ui-screenshot`: the page of a few nodes under load, for docs/ui.png.
	if path := os.Getenv("PYFLEET_UI_SCREENSHOT"); path != "" {
		c := startNode(t, nodeOptions{app: jobsApp(), workers: 3, extra: []string{"--nats", a.url}})
		d := startNode(t, nodeOptions{app: jobsApp(), workers: 2, extra: []string{"--nats", a.url}})
		waitJS(t, page, 30*time.Second, "the new nodes up", up(c)+" && "+up(d))
		load(t, cl, 8*time.Second)
		screenshot(t, page, path)
	}
}

// load keeps a few callers busy for d: quick calls, slower ones, some
// failures and a few jobs, so that every section of the page has figures.
func load(t *testing.T, cl *client.Client, d time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	var wg sync.WaitGroup
	for i := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; ctx.Err() == nil; n++ {
				switch {
				case i == 0 && n%20 == 0:
					_ = cl.Call(ctx, "always_fails", map[string]int{"n": n}, nil)
				case i%2 == 0:
					_ = cl.Call(ctx, "sleep", map[string]int{"ms": 20 + n%50}, nil)
				case i == 5 && n%10 == 0:
					_, _ = cl.Submit(ctx, "sleep", map[string]int{"ms": 300})
				default:
					_ = cl.Call(ctx, "echo", map[string]int{"n": n}, nil)
				}
			}
		}()
	}
	wg.Wait()
}

func screenshot(t *testing.T, page context.Context, path string) {
	t.Helper()
	png, err := chromedp.Run(page, chromedp.FullScreenshot(100) /* 100: PNG */)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, png, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestUIHundredWorkers: the page of a node with 100 workers under load
// keeps up: it shows every worker, gets at most 4 pushes a second however
// much changes, and its rendering time is reported (a figure, not a
// target: the machine is shared).
//
// A hundred interpreters are more than the shared 2-core machine of `make
// test` starts reliably alongside the rest of the suite, so this runs
// with `make ui-load` (PYFLEET_UI_LOAD=1), as the stress tests do.
func TestUIHundredWorkers(t *testing.T) {
	if os.Getenv("PYFLEET_UI_LOAD") == "" {
		t.Skip("100 workers: run with `make ui-load` (PYFLEET_UI_LOAD=1)")
	}
	n := launchNode(t, nodeOptions{app: jobsApp(), workers: 100})
	// A hundred interpreters take a while to start on a busy machine.
	select {
	case <-n.serving:
	case <-n.done:
		t.Fatalf("poolnode exited before serving: %v", n.err)
	case <-time.After(5 * time.Minute):
		t.Fatal("poolnode with 100 workers not serving after 5 min")
	}
	cl, err := client.Connect(n.url, client.Options{Pool: "default"})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	page, _ := uiPage(t, cl)
	waitJS(t, page, 2*time.Minute, "100 workers", `document.querySelectorAll('tr[data-worker]').length == 100`)
	stats := func() (pushes, bytes int, maxMs, totalMs float64) {
		v, err := chromedp.Run(page, chromedp.Evaluate[map[string]float64](`window.pyfleetStats`))
		if err != nil {
			t.Fatal(err)
		}
		return int(v["pushes"]), int(v["bytes"]), v["renderMsMax"], v["renderMsTotal"]
	}
	p0, b0, _, ms0 := stats()
	start := time.Now()
	load(t, cl, 6*time.Second)
	elapsed := time.Since(start)
	p1, b1, maxMs, ms1 := stats()
	pushes := p1 - p0
	// Events, polls and jobs change the state many times a second under
	// load; the server coalesces them (ui.pushEvery, 250 ms).
	if limit := int(elapsed/(250*time.Millisecond)) + 2; pushes > limit {
		t.Fatalf("%d pushes in %s: more than 4 a second", pushes, elapsed)
	}
	if pushes == 0 {
		t.Fatal("no push reached the page under load")
	}
	t.Logf("100 workers under load: %d pushes in %s, %d KB each, render %.1f ms mean, %.1f ms max",
		pushes, elapsed.Round(time.Millisecond), (b1-b0)/pushes/1024, (ms1-ms0)/float64(pushes), maxMs)
}

func post(t *testing.T, url, contentType, body string) int {
	t.Helper()
	resp, err := http.Post(url+"/api/action", contentType, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}
