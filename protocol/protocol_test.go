package protocol_test

import (
	"errors"
	"strconv"
	"strings"
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/protocol"
)

func TestValidToken(t *testing.T) {
	for _, ok := range []string{"default", "node-1_a", "héllo", "A"} {
		if err := protocol.ValidToken(ok); err != nil {
			t.Errorf("ValidToken(%q) = %v", ok, err)
		}
	}
	for _, bad := range []string{"", "a.b", "a*", ">", "a b", "a\tb", "a\nb", "\x00", "\xff"} {
		err := protocol.ValidToken(bad)
		if err == nil {
			t.Errorf("ValidToken(%q) accepted", bad)
			continue
		}
		var ne *protocol.NameError
		if !errors.Is(err, protocol.ErrInvalidName) || !errors.As(err, &ne) || ne.Reason == "" {
			t.Errorf("ValidToken(%q) = %#v, want a *NameError with a reason", bad, err)
		}
		if bad != "" && !strings.Contains(err.Error(), strconv.Quote(bad)) {
			t.Errorf("ValidToken(%q) = %v, does not name the value", bad, err)
		}
	}
}

func TestValidPrefix(t *testing.T) {
	for _, ok := range []string{"pyfleet", "acme.pyfleet", "a.b.c"} {
		if err := protocol.ValidPrefix(ok); err != nil {
			t.Errorf("ValidPrefix(%q) = %v", ok, err)
		}
	}
	for _, bad := range []string{"", ".", "a.", ".a", "a..b", "a.*", "a.>", "a b.c"} {
		err := protocol.ValidPrefix(bad)
		var ne *protocol.NameError
		if !errors.Is(err, protocol.ErrInvalidName) || !errors.As(err, &ne) {
			t.Errorf("ValidPrefix(%q) = %v, want a *NameError", bad, err)
		}
	}
}

func TestSubjects(t *testing.T) {
	for _, c := range []struct{ got, want string }{
		{protocol.Subjects{}.Request("p", "f"), "pyfleet.req.p.f"},
		{protocol.Subjects{Prefix: "acme.pf"}.Request("p", "f"), "acme.pf.req.p.f"},
		{protocol.Subjects{}.Node("n", "p", "f"), "pyfleet.node.n.p.f"},
		{protocol.Subjects{}.Job("p", "f"), "pyfleet.job.p.f"},
		{protocol.Subjects{}.Result("p", "id"), "pyfleet.result.p.id"},
		{protocol.Subjects{}.Dead("p", "f"), "pyfleet.dead.p.f"},
		{protocol.Subjects{}.Event("p", "n", "ready"), "pyfleet.evt.p.n.ready"},
	} {
		if c.got != c.want {
			t.Errorf("got %q, want %q", c.got, c.want)
		}
	}
}

// TestHeader: a header sent in another spelling is still read; the
// canonical spelling wins when both are there.
func TestHeader(t *testing.T) {
	h := nats.Header{"pyfleet-timeout": {"500"}}
	if got := protocol.Header(h, protocol.HeaderTimeout); got != "500" {
		t.Errorf("lower case: %q", got)
	}
	h[protocol.HeaderTimeout] = []string{"700"}
	if got := protocol.Header(h, protocol.HeaderTimeout); got != "700" {
		t.Errorf("both spellings: %q", got)
	}
	if got := protocol.Header(nats.Header{"Pyfleet-Timeout": {}}, protocol.HeaderTimeout); got != "" {
		t.Errorf("no value: %q", got)
	}
}

func TestReplyError(t *testing.T) {
	for _, c := range []struct {
		name string
		h    nats.Header
		body string
		want *call.Error // nil: a success
	}{
		{"ok", nats.Header{protocol.HeaderStatus: {protocol.StatusOK}}, `{"error":1}`, nil},
		{"no headers", nil, `{"error":{"code":500}}`, nil},
		{"body", nats.Header{protocol.HeaderStatus: {protocol.StatusError}, protocol.HeaderWorker: {"w1"},
			protocol.HeaderErrorCode: {"400"}, protocol.HeaderError: {"short"}},
			`{"error":{"code":400,"type":"BadRequest","message":"the whole message"}}`,
			&call.Error{Code: 400, Type: "BadRequest", Message: "the whole message", Worker: "w1"}},
		{"headers only", nats.Header{"nats-service-error-code": {"503"}, "nats-service-error": {"busy"}}, "",
			&call.Error{Code: 503, Type: call.TypeError, Message: "busy"}},
		{"status only", nats.Header{protocol.HeaderStatus: {protocol.StatusError}}, "not json",
			&call.Error{Code: call.CodeFailed, Type: call.TypeError}},
	} {
		got := protocol.ReplyError(c.h, []byte(c.body))
		switch {
		case c.want == nil && got != nil:
			t.Errorf("%s: %+v, want none", c.name, got)
		case c.want != nil && (got == nil || *got != *c.want):
			t.Errorf("%s: %+v, want %+v", c.name, got, c.want)
		}
	}
}
