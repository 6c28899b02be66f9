package client

import (
	"cmp"
	"context"
	"encoding/json"
	"slices"

	"github.com/nats-io/nats.go/micro"

	"github.com/pyfleet/pyfleet/protocol"
)

// FunctionInfo is one function of the client's pool as the nodes that
// serve it describe it in their micro service INFO (docs/protocol.md,
// "Micro service").
type FunctionInfo struct {
	Name   string `json:"name"`
	Pool   string `json:"pool"`
	Raw    bool   `json:"raw"`    // bytes in and out, no JSON
	Stream bool   `json:"stream"` // answers with chunks
	// InputSchema and OutputSchema are the JSON Schemas of the body the
	// function takes and the value it returns (README, "Writing an app");
	// nil where the node published none (a raw function, a schema over
	// protocol.MaxSchemaBytes, a node from before schemas).
	InputSchema  json.RawMessage `json:"input_schema,omitempty"`
	OutputSchema json.RawMessage `json:"output_schema,omitempty"`
	// RateLimit is the function's limit on starts across the pool, as
	// its app declared it ("100/s"), or "" for none.
	RateLimit string `json:"rate_limit,omitempty"`
	// Nodes serving it, sorted.
	Nodes []string `json:"nodes"`
}

// Functions asks every node of the client's pool for its micro service
// INFO and returns the functions they serve, sorted by name, from the
// answers that arrive within DefaultNodesWait, or WithTimeout's duration,
// or before ctx's deadline if that comes first. Nodes of a pool run the
// same app; where two disagree (one is being upgraded), the description
// of the first node to answer is kept. No node answering is not an error:
// the list is empty.
func (c *Client) Functions(ctx context.Context, opts ...Option) ([]FunctionInfo, error) {
	wait := collect(opts).timeout
	if wait <= 0 {
		wait = DefaultNodesWait
	}
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	byName := map[string]*FunctionInfo{}
	err := c.collectService(ctx, micro.InfoVerb, "functions", func(data []byte) string {
		var info micro.Info
		if json.Unmarshal(data, &info) != nil || info.ID == "" {
			return ""
		}
		if p := info.Metadata[protocol.MetaPrefix]; p != "" && p != c.subjects.Root() {
			return info.ID // a fleet under another prefix shares the service name
		}
		if info.Metadata[protocol.MetaPool] != c.pool {
			return info.ID
		}
		node := cmp.Or(info.Metadata[protocol.MetaNode], info.ID)
		for _, ep := range info.Endpoints {
			name := ep.Metadata[protocol.MetaFunction]
			if name == "" || name == "*" {
				continue
			}
			f := byName[name]
			if f == nil {
				f = &FunctionInfo{
					Name:         name,
					Pool:         c.pool,
					Raw:          ep.Metadata[protocol.MetaRaw] == "true",
					Stream:       ep.Metadata[protocol.MetaStream] == "true",
					InputSchema:  schema(ep.Metadata[protocol.MetaInputSchema]),
					OutputSchema: schema(ep.Metadata[protocol.MetaOutputSchema]),
					RateLimit:    ep.Metadata[protocol.MetaRateLimit],
				}
				byName[name] = f
			}
			if !slices.Contains(f.Nodes, node) {
				f.Nodes = append(f.Nodes, node)
			}
		}
		return info.ID
	})
	if err != nil {
		return nil, err
	}
	out := make([]FunctionInfo, 0, len(byName))
	for _, f := range byName {
		slices.Sort(f.Nodes)
		out = append(out, *f)
	}
	slices.SortFunc(out, func(x, y FunctionInfo) int { return cmp.Compare(x.Name, y.Name) })
	return out, nil
}

// schema is a published schema, or nil if it is not JSON.
func schema(s string) json.RawMessage {
	if s == "" || !json.Valid([]byte(s)) {
		return nil
	}
	return json.RawMessage(s)
}
