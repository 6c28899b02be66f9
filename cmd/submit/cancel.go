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
	cl, job, err := a.jobByID(c.pool, args)
	if err != nil {
		return err
	}
	defer cl.Close()
	ok, err := job.Cancel(ctx)
	var ce *client.Error
	if errors.As(err, &ce) && ce.Type == client.TypeNoStatus {
		return errors.New(ce.Message)
	}
	if err != nil {
		return err
	}
	if ok {
		fmt.Fprintf(a.stdout, "cancelled %s\n", job.ID)
		return nil
	}
	state, err := job.Status(ctx)
	if err != nil {
		return err
	}
	return fmt.Errorf("job %s has ended already (%s); nothing to cancel", job.ID, state)
}

// jobByID connects for the one job ID that args must be, in pool.
func (a *app) jobByID(pool string, args []string) (*client.Client, *client.Job, error) {
	if len(args) != 1 {
		return nil, nil, usagef("want one job ID, got %d arguments", len(args))
	}
	if err := checkToken("--pool", pool); err != nil {
		return nil, nil, err
	}
	if err := checkToken("job ID", args[0]); err != nil {
		return nil, nil, err
	}
	cl, err := a.connect(client.Options{Pool: pool})
	if err != nil {
		return nil, nil, err
	}
	return cl, cl.Job(args[0]), nil
}
