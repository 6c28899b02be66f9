package bus

import (
	"strings"
	"testing"

	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/protocol"
)

// A function's endpoint metadata carries its schemas, as `nats micro info`
// shows them, and leaves out what it has none of or what is too large.
func TestFunctionMeta(t *testing.T) {
	m := functionMeta(call.Function{Name: "scale", InputSchema: []byte(`{"type":"object"}`), OutputSchema: []byte(`{}`)})
	if m[protocol.MetaFunction] != "scale" || m[protocol.MetaRaw] != "false" || m[protocol.MetaStream] != "false" ||
		m[protocol.MetaInputSchema] != `{"type":"object"}` || m[protocol.MetaOutputSchema] != `{}` {
		t.Errorf("scale: %v", m)
	}
	big := []byte(`{"d":"` + strings.Repeat("x", protocol.MaxSchemaBytes) + `"}`)
	m = functionMeta(call.Function{Name: "raw", Raw: true, OutputSchema: big})
	if _, ok := m[protocol.MetaInputSchema]; ok {
		t.Errorf("raw: input schema %q, want none", m[protocol.MetaInputSchema])
	}
	if _, ok := m[protocol.MetaOutputSchema]; ok {
		t.Errorf("raw: an output schema over %d bytes was published", protocol.MaxSchemaBytes)
	}
	if m[protocol.MetaRaw] != "true" {
		t.Errorf("raw: %v", m)
	}
}
