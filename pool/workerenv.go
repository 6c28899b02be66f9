package pool

import "strings"

// envPrefix is pyfleet's own namespace in the environment. The poolnode
// reads every flag from PYFLEET_<FLAG> (PYFLEET_NATS_PASSWORD,
// PYFLEET_NATS_TOKEN, PYFLEET_NATS_CREDS, PYFLEET_NATS_TLS_KEY, ...), so the
// node's environment may hold its NATS credentials; a worker runs the app's
// code and has no use for them.
const envPrefix = "PYFLEET_"

// workerEnv is the environment a worker starts with: the node's (what the
// app needs: PATH, HOME, its own settings), less every PYFLEET_ variable.
// What pyfleet gives a worker it adds after this: the fds of the lifeline
// and the secret (spawnWorker), and the markers (lifecycle.Start).
func workerEnv(environ []string) []string {
	env := make([]string, 0, len(environ))
	for _, kv := range environ {
		if !strings.HasPrefix(kv, envPrefix) {
			env = append(env, kv)
		}
	}
	return env
}
