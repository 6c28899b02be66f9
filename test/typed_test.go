package test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pyfleet/pyfleet/client"
)

// TestTypedFunctions is issue 13's typed functions against a real node:
// a typed function binds a JSON object by name, refuses a field of the
// wrong type or a missing one with a 400 naming it, and its schemas are
// published where `nats micro info`, `submit fns` and the Go client see
// them.
func TestTypedFunctions(t *testing.T) {
	n := startNode(t, nodeOptions{app: filepath.Join(repoRoot, "test", "apps", "typed.py"), workers: 1})
	cl, err := client.Connect(n.url, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	var got json.RawMessage
	if err := cl.Call(ctx, "resize", json.RawMessage(`{"url":"u","width":64}`), &got); err != nil {
		t.Fatal(err)
	}
	if want := `{"url":"u","width":64,"formats":["png"]}`; string(got) != want {
		t.Fatalf("resize = %s, want %s", got, want)
	}

	for _, tc := range []struct{ body, want string }{
		{`{"url":"u","width":"wide"}`, "width: expected `int`, got `str`"},
		{`{"width":3}`, "url: missing required field (expected str)"},
		{`{"url":"u","height":3}`, "height: unknown field"},
		{`{"url":"u","formats":["png",7]}`, "formats[1]: expected `str`, got `int`"},
		{`{"url":"u","fit":"stretch"}`, "fit: invalid enum value 'stretch'"},
		{`["u"]`, "resize takes a JSON object of its parameters (url, width, formats, fit), not array"},
	} {
		err := cl.Call(ctx, "resize", json.RawMessage(tc.body), nil)
		var ce *client.Error
		if !errors.As(err, &ce) || ce.Code != 400 || !strings.Contains(ce.Message, tc.want) {
			t.Errorf("resize(%s): %v, want a 400 with %q", tc.body, err, tc.want)
		}
	}

	fns, err := cl.Functions(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(fns) != 2 || fns[0].Name != "echo" || fns[1].Name != "resize" {
		t.Fatalf("Functions = %+v, want echo and resize", fns)
	}
	resize := fns[1]
	if len(resize.Nodes) != 1 || resize.Nodes[0] != n.name {
		t.Errorf("resize served by %v, want [%s]", resize.Nodes, n.name)
	}
	var in struct {
		Type       string `json:"type"`
		Required   []string
		Properties map[string]struct {
			Type    string `json:"type"`
			Default any    `json:"default"`
		} `json:"properties"`
	}
	if err := json.Unmarshal(resize.InputSchema, &in); err != nil {
		t.Fatalf("input schema %s: %v", resize.InputSchema, err)
	}
	if in.Type != "object" || len(in.Required) != 1 || in.Required[0] != "url" ||
		in.Properties["width"].Type != "integer" || in.Properties["width"].Default != 256.0 ||
		in.Properties["formats"].Type != "array" {
		t.Errorf("resize input schema: %s", resize.InputSchema)
	}
	if !strings.Contains(string(resize.OutputSchema), `"Thumb"`) {
		t.Errorf("resize output schema does not name Thumb: %s", resize.OutputSchema)
	}
	if string(fns[0].InputSchema) != `{}` {
		t.Errorf("echo takes any body, its schema is %s", fns[0].InputSchema)
	}

	out, err := exec.Command(natsCLIPath(t), "--server", n.url, "micro", "info", "pyfleet", "--json").CombinedOutput()
	if err != nil {
		t.Fatalf("nats micro info: %v\n%s", err, out)
	}
	var answer struct {
		Info struct {
			Endpoints []struct {
				Metadata map[string]string `json:"metadata"`
			} `json:"endpoints"`
		} `json:"info"`
	}
	if err := json.Unmarshal(out, &answer); err != nil {
		t.Fatalf("nats micro info --json: %v\n%s", err, out)
	}
	found := false
	for _, ep := range answer.Info.Endpoints {
		if ep.Metadata["function"] == "resize" {
			found = true
			if ep.Metadata["input_schema"] != string(resize.InputSchema) || ep.Metadata["output_schema"] != string(resize.OutputSchema) {
				t.Errorf("micro info metadata of resize: %v, want the schemas Functions returned", ep.Metadata)
			}
		}
	}
	if !found {
		t.Errorf("no endpoint of resize in micro info:\n%s", out)
	}

	stdout, stderr, code := runSubmit(t, n.url, "", "fns")
	if code != 0 {
		t.Fatalf("submit fns: exit %d: %s", code, stderr)
	}
	if want := "(url: string, width?: integer, formats?: array of string, fit?: \"crop\"|\"pad\")"; !strings.Contains(stdout, want) ||
		!strings.Contains(stdout, "Thumb") {
		t.Errorf("submit fns:\n%s\nwant a line with %s and Thumb", stdout, want)
	}
	stdout, stderr, code = runSubmit(t, n.url, "", "fns", "--json")
	var listed []client.FunctionInfo
	var compact bytes.Buffer
	if code != 0 || json.Unmarshal([]byte(stdout), &listed) != nil || len(listed) != 2 ||
		json.Compact(&compact, listed[1].InputSchema) != nil || compact.String() != string(resize.InputSchema) {
		t.Errorf("submit fns --json: exit %d, %s\n%s", code, stdout, stderr)
	}
}
