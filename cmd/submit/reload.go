package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/user"
	"slices"
	"time"

	"github.com/pyfleet/pyfleet/client"
)

type reloadCmd struct {
	pool    string
	wait    time.Duration
	timeout time.Duration
}

func (c *reloadCmd) flags(fs *flag.FlagSet) {
	fs.StringVar(&c.pool, "pool", "default", "`POOL` of the nodes")
	fs.DurationVar(&c.wait, "wait", 500*time.Millisecond, "without NODE arguments, how long to collect the pool's nodes")
	fs.DurationVar(&c.timeout, "timeout", 10*time.Minute, "how long each node may take to reload (it recycles every worker)")
}

func (c *reloadCmd) run(ctx context.Context, a *app, nodes []string) error {
	if err := checkToken("--pool", c.pool); err != nil {
		return err
	}
	for _, n := range nodes {
		if err := checkToken("NODE", n); err != nil {
			return err
		}
	}
	if c.wait <= 0 || c.timeout <= 0 {
		return usagef("--wait and --timeout must be positive")
	}
	cl, err := a.connect(client.Options{Pool: c.pool})
	if err != nil {
		return err
	}
	defer cl.Close()
	if len(nodes) == 0 {
		infos, err := cl.Nodes(ctx, client.WithTimeout(c.wait))
		if err != nil {
			return err
		}
		for _, n := range infos {
			if n.Pool == c.pool {
				nodes = append(nodes, n.Node)
			}
		}
		if len(nodes) == 0 {
			return unavailablef("no node of pool %s answered", c.pool)
		}
		slices.Sort(nodes)
	}
	by := "submit reload, " + whoAmI()
	// One node after the other: while one recycles its workers, the others
	// serve at full strength.
	for _, n := range nodes {
		start := time.Now()
		nctx, cancel := context.WithTimeout(ctx, c.timeout)
		err := cl.Reload(nctx, c.pool, n, by)
		cancel()
		if err != nil {
			return err
		}
		fmt.Fprintf(a.stdout, "reloaded %s in %s\n", n, time.Since(start).Round(time.Millisecond))
	}
	return nil
}

// whoAmI is user@host, for the node's log of who asked.
func whoAmI() string {
	name := "?"
	if u, err := user.Current(); err == nil {
		name = u.Username
	}
	host, _ := os.Hostname()
	return name + "@" + host
}
