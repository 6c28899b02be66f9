package lifecycle

import "github.com/pyfleet/pyfleet/lifecycle/pidinit"

// InitArg, as the first argument, turns a binary that links lifecycle into
// the init of a worker's PID namespace; its main must hand over to
// InitMain when it sees it. poolnode does, for where bin/pyfleet-init is
// not installed beside it (see pidinitBinary).
const InitArg = pidinit.Arg

// InitMain is the whole life of a worker's init (pidinit.Main).
func InitMain(args []string) int { return pidinit.Main(args) }
