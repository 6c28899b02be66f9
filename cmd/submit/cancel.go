package main

import (
	"context"
	"errors"
	"flag"
	"fmt"

	"github.com/pyfleet/pyfleet/client"
)

type cancelCmd struct {
	pool string
}

func (c *cancelCmd) flags(fs *flag.FlagSet) {
	fs.StringVar(&c.pool, "pool", "default", "`POOL` of the job")
}

func (c *cancelCmd) run(ctx context.Context, a *app, args []string) error {
	if len(args) != 1 {
		return usagef("want one job ID, got %d arguments", len(args))
	}
	id := args[0]
	if err := checkToken("--pool", c.pool); err != nil {
		return err
	}
	if err := checkToken("job ID", id); err != nil {
		return err
	}
	cl, err := a.connect(client.Options{Pool: c.pool})
	if err != nil {
		return err
	}
	defer cl.Close()
	job := cl.Job(id)
	ok, err := job.Cancel(ctx)
	var ce *client.Error
	if errors.As(err, &ce) && ce.Type == client.TypeNoStatus {
		return errors.New(ce.Message)
	}
	if err != nil {
		return err
	}
	if ok {
		fmt.Fprintf(a.stdout, "cancelled %s\n", id)
		return nil
	}
	state, err := job.Status(ctx)
	if err != nil {
		return err
	}
	return fmt.Errorf("job %s has ended already (%s); nothing to cancel", id, state)
}
