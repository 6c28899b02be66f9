package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/pyfleet/pyfleet/client"
)

type fnsCmd struct {
	pool string
	wait time.Duration
	json bool
}

func (c *fnsCmd) flags(fs *flag.FlagSet) {
	fs.StringVar(&c.pool, "pool", "default", "`POOL` whose functions to list")
	fs.DurationVar(&c.wait, "wait", 500*time.Millisecond, "how long to collect answers")
	fs.BoolVar(&c.json, "json", false, "print a JSON array, schemas included")
}

func (c *fnsCmd) run(ctx context.Context, a *app, args []string) error {
	if err := noArgs(args); err != nil {
		return err
	}
	if err := checkToken("--pool", c.pool); err != nil {
		return err
	}
	if c.wait <= 0 {
		return usagef("--wait must be positive")
	}
	cl, err := a.connect(client.Options{Pool: c.pool})
	if err != nil {
		return err
	}
	defer cl.Close()
	fns, err := cl.Functions(ctx, client.WithTimeout(c.wait))
	if err != nil {
		return err
	}
	if c.json {
		b, err := json.MarshalIndent(fns, "", "  ")
		if err != nil {
			return err
		}
		if _, err := a.stdout.Write(append(b, '\n')); err != nil {
			return err
		}
	} else if err := printFunctions(a.stdout, fns); err != nil {
		return err
	}
	if len(fns) == 0 {
		return unavailablef("no node of pool %s answered", c.pool)
	}
	return nil
}

// printFunctions shows one line per function: its name, kind, the
// parameters it takes and what it returns, read from its schemas.
func printFunctions(w io.Writer, fns []client.FunctionInfo) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "FUNCTION\tKIND\tTAKES\tRETURNS\tNODES")
	for _, f := range fns {
		kind := "json"
		switch {
		case f.Raw:
			kind = "raw"
		case f.Stream:
			kind = "stream"
		}
		takes, returns := "bytes", "bytes"
		if !f.Raw {
			takes, returns = describeInput(f.InputSchema), describeSchema(f.OutputSchema)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\n", f.Name, kind, takes, returns, len(f.Nodes))
	}
	return tw.Flush()
}

// describeInput is a typed function's parameters, "(url: string, width?:
// integer)", where "?" marks one with a default; a plain function's body is
// its schema's type.
func describeInput(raw json.RawMessage) string {
	var s struct {
		Type       string                     `json:"type"`
		Properties map[string]json.RawMessage `json:"properties"`
		Required   []string                   `json:"required"`
		Additional *bool                      `json:"additionalProperties"`
	}
	if len(raw) == 0 || json.Unmarshal(raw, &s) != nil {
		return "-"
	}
	if s.Type != "object" || s.Additional == nil || *s.Additional || s.Properties == nil {
		return describeSchema(raw)
	}
	// The order of the parameters is the order of the properties in the
	// schema, which a map forgets: read the keys in order.
	keys := orderedKeys(raw)
	required := map[string]bool{}
	for _, r := range s.Required {
		required[r] = true
	}
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		opt := "?"
		if required[k] {
			opt = ""
		}
		parts = append(parts, k+opt+": "+describeSchema(s.Properties[k]))
	}
	return "(" + strings.Join(parts, ", ") + ")"
}

// describeSchema names a schema's type briefly: "string", "array of
// string", "Thumb" for a reference, "any" for the empty schema.
func describeSchema(raw json.RawMessage) string {
	var s struct {
		Type  any               `json:"type"`
		Ref   string            `json:"$ref"`
		Title string            `json:"title"`
		Items json.RawMessage   `json:"items"`
		Enum  []any             `json:"enum"`
		AnyOf []json.RawMessage `json:"anyOf"`
	}
	if len(raw) == 0 {
		return "-"
	}
	if json.Unmarshal(raw, &s) != nil {
		return "?"
	}
	switch {
	case s.Ref != "":
		return s.Ref[strings.LastIndex(s.Ref, "/")+1:]
	case s.Title != "":
		return s.Title
	case len(s.Enum) > 0:
		vals := make([]string, len(s.Enum))
		for i, v := range s.Enum {
			b, _ := json.Marshal(v)
			vals[i] = string(b)
		}
		return strings.Join(vals, "|")
	case len(s.AnyOf) > 0:
		alts := make([]string, len(s.AnyOf))
		for i, a := range s.AnyOf {
			alts[i] = describeSchema(a)
		}
		return strings.Join(alts, "|")
	}
	switch t := s.Type.(type) {
	case string:
		if t == "array" && len(s.Items) > 0 {
			return "array of " + describeSchema(s.Items)
		}
		return t
	case nil:
		return "any"
	}
	return "?"
}

// orderedKeys lists the keys of raw's "properties" object in their order.
func orderedKeys(raw json.RawMessage) []string {
	var top map[string]json.RawMessage
	if json.Unmarshal(raw, &top) != nil {
		return nil
	}
	dec := json.NewDecoder(strings.NewReader(string(top["properties"])))
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return nil
	}
	var keys []string
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return keys
		}
		keys = append(keys, t.(string))
		var skip json.RawMessage
		if dec.Decode(&skip) != nil {
			return keys
		}
	}
	return keys
}
