package node

import (
	"context"
	"os"
	"os/signal"
	"syscall"
	"time"

	"go.uber.org/zap"
)

// reloadOnHangup reloads the app on SIGHUP until ctx ends: a new template
// (--preload), then a rolling recycle of the workers (pool.Reload). A
// SIGHUP during a reload is one more reload once it is done.
func (n *node) reloadOnHangup(ctx context.Context) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	for {
		select {
		case <-hup:
		case <-ctx.Done():
			return
		}
		start := time.Now()
		n.log.Info("SIGHUP: reloading the app")
		if err := n.pool.Reload(ctx); err != nil {
			n.log.Warn("reload failed; the workers that serve keep serving", zap.Error(err))
			continue
		}
		n.log.Info("reloaded", zap.Duration("took", time.Since(start)))
	}
}
