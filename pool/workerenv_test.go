package pool

import (
	"slices"
	"testing"
)

func TestWorkerEnvDropsPyfleetSettings(t *testing.T) {
	got := workerEnv([]string{
		"PATH=/usr/bin",
		"PYFLEET_NATS_PASSWORD=pw",
		"PYFLEET_NATS_TOKEN=tok",
		"PYFLEET_NATS_CREDS=/secret/user.creds",
		"PYFLEET_NATS_TLS_KEY=/secret/key.pem",
		"PYFLEET_WORKERS=4",
		"PYFLEET_WORKER_RUN=an/inherited-marker", // lifecycle sets the worker's own
		"DATABASE_URL=postgres://app",
		"NATS_URL=nats://elsewhere", // the app's own, not the node's (which reads PYFLEET_NATS)
		"XPYFLEET_KEEP=1",
	})
	want := []string{"PATH=/usr/bin", "DATABASE_URL=postgres://app", "NATS_URL=nats://elsewhere", "XPYFLEET_KEEP=1"}
	if !slices.Equal(got, want) {
		t.Errorf("workerEnv = %q, want %q", got, want)
	}
}
