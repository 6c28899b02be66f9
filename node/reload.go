package node

import (
	"context"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"go.uber.org/zap"
)

// reloadOnHangup reloads the app on SIGHUP or a reload request (`submit
// reload`, status.go's control) until ctx ends: a new template
// (--preload), then a rolling recycle of the workers (pool.Reload). One
// loop does both so that two reloads never overlap; a request asked during
// a reload is one more reload once it is done, and is answered when its own
// is.
func (n *node) reloadOnHangup(ctx context.Context) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	defer n.refuseReloads("the node is stopping")
	for {
		var req *nats.Msg
		select {
		case <-hup:
			n.log.Info("SIGHUP: reloading the app")
		case req = <-n.reloads:
			n.log.Info("reload request: reloading the app")
		case <-ctx.Done():
			return
		}
		start := time.Now()
		err := n.pool.Reload(ctx)
		if err != nil {
			n.log.Warn("reload failed; the workers that serve keep serving", zap.Error(err))
		} else {
			n.log.Info("reloaded", zap.Duration("took", time.Since(start)))
		}
		if req != nil {
			rep := ControlReply{OK: err == nil}
			if err != nil {
				rep.Error = "reload: " + err.Error()
			}
			respondControl(req, rep)
		}
	}
}

// refuseReloads answers the reload requests still waiting, so that no
// caller waits out its timeout for a node that will not reload.
func (n *node) refuseReloads(why string) {
	for {
		select {
		case req := <-n.reloads:
			respondControl(req, ControlReply{Error: "reload: " + why})
		default:
			return
		}
	}
}
