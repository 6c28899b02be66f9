package pool

import (
	"strings"
	"testing"

	"github.com/pyfleet/pyfleet/protocol"
)

// The worker's schemas reach the functions the pool reports, compacted;
// ones the node must not publish (not an object, over the limit) do not.
func TestHandshakeSchemas(t *testing.T) {
	big := `{"description":"` + strings.Repeat("x", protocol.MaxSchemaBytes) + `"}`
	line := `PYFLEET-READY {"v":2,"pid":7,"functions":[` +
		`{"name":"scale","raw":false,"stream":false,"inline":true,` +
		`"input_schema":{"type": "object", "required": ["values"]},"output_schema":{"type":"array"}},` +
		`{"name":"echo","input_schema":{},"output_schema":{}},` +
		`{"name":"odd","input_schema":[1],"output_schema":` + big + `},` +
		`{"name":"reverse","raw":true}]}`
	res, ok := parseHandshake("w1", []byte(line))
	if !ok || res.err != nil {
		t.Fatalf("parseHandshake: ok %v, err %v", ok, res.err)
	}
	p := &Pool{}
	p.setFunctions(res.hs)
	got := map[string][2]string{}
	for _, f := range p.Functions() {
		got[f.Name] = [2]string{string(f.InputSchema), string(f.OutputSchema)}
	}
	want := map[string][2]string{
		"scale":   {`{"type":"object","required":["values"]}`, `{"type":"array"}`},
		"echo":    {`{}`, `{}`},
		"odd":     {"", ""},
		"reverse": {"", ""},
	}
	for name, w := range want {
		if got[name] != w {
			t.Errorf("%s: schemas %q, want %q", name, got[name], w)
		}
	}
}
