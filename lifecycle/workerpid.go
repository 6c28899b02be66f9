package lifecycle

import (
	"os"
	"strconv"
	"strings"
)

// WorkerPID is the host pid of the interpreter behind pid, the process the
// node started: pid itself, or, when pid is the init of the worker's PID
// namespace (ModePIDNS, ModeCgroup under root), its one child. An operator
// who looks a worker up in ps or kills it wants that process, not the init.
func WorkerPID(pid int) int {
	if !isNamespaceInit(pid) {
		return pid
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/task/" + strconv.Itoa(pid) + "/children")
	if err != nil {
		return pid
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return pid
	}
	if c, err := strconv.Atoi(f[0]); err == nil {
		return c
	}
	return pid
}
