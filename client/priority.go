package client

import (
	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/protocol"
)

// WithPriority submits a job as "high", "normal" (the default) or "low"
// priority: every node fetches the high jobs waiting before any normal one,
// and the normal ones before any low one (docs/protocol.md, "Priorities").
// Submit refuses another value. Calls ignore it.
func WithPriority(p string) Option { return func(o *options) { o.priority = p } }

// checkPriority refuses a priority that is none of protocol.Priorities,
// before anything is sent.
func checkPriority(p string) error {
	if err := protocol.ValidPriority(p); err != nil {
		return localError(call.CodeBadRequest, call.TypeBadRequest, err, "%v", err)
	}
	return nil
}
