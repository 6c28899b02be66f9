package client_test

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/pyfleet/pyfleet/client"
)

// The examples call the node TestMain starts (client/testdata/app.py) on
// an embedded NATS server at natsURL; against a fleet of your own, use its
// URL, such as "nats://127.0.0.1:4222".

func ExampleClient_Call() {
	c, err := client.Connect(natsURL, client.Options{Pool: "default"})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	// JSON in, JSON out.
	var out map[string]int
	if err := c.Call(ctx, "echo", map[string]int{"hi": 1}, &out); err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(out["hi"])

	// Bytes in, bytes out: a function exported with raw=True.
	var reversed []byte
	if err := c.Call(ctx, "reverse", []byte("pyfleet"), &reversed); err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(string(reversed))
	// Output:
	// 1
	// teelfyp
}

func ExampleClient_Stream() {
	c, err := client.Connect(natsURL, client.Options{})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	// Each item as soon as the generator yields it.
	for item, err := range c.Stream(ctx, "count", map[string]int{"n": 3}) {
		if err != nil {
			fmt.Println(err)
			return
		}
		var i int
		if err := item.Decode(&i); err != nil {
			fmt.Println(err)
			return
		}
		fmt.Println("item", i)
	}
	// Output:
	// item 0
	// item 1
	// item 2
}

func ExampleClient_Session() {
	c, err := client.Connect(natsURL, client.Options{})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	// Every call of a session runs on the same worker.
	s := c.Session("")
	pids := map[int]bool{}
	for range 5 {
		var who struct{ PID int }
		if err := s.Call(ctx, "whoami", nil, &who); err != nil {
			fmt.Println(err)
			return
		}
		pids[who.PID] = true
	}
	fmt.Println("workers seen:", len(pids))
	// Output:
	// workers seen: 1
}

func ExampleClient_Submit() {
	c, err := client.Connect(natsURL, client.Options{})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	job, err := c.Submit(ctx, "echo", map[string]int{"x": 1}, client.WithAwait())
	if err != nil {
		fmt.Println(err)
		return
	}
	var out map[string]int
	if err := job.Result(ctx, &out); err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("x =", out["x"])

	// Anyone who knows the id can read the stored result.
	out = nil
	if err := c.Job(job.ID).Result(ctx, &out); err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("again x =", out["x"])
	// Output:
	// x = 1
	// again x = 1
}

func ExampleClient_Nodes() {
	c, err := client.Connect(natsURL, client.Options{})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer c.Close()

	nodes, err := c.Nodes(context.Background())
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, n := range nodes {
		if n.Pool == "default" && n.Workers != nil {
			fmt.Println(n.Pool, *n.Workers, "workers")
		}
	}
	// Output:
	// default 2 workers
}

func ExampleClient_Functions() {
	c, err := client.Connect(natsURL, client.Options{Pool: "default"})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	// The schemas a typed function publishes, from every node's micro INFO.
	fns, err := c.Functions(ctx)
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, f := range fns {
		if f.Name == "scale" {
			fmt.Println(string(f.InputSchema))
			fmt.Println(string(f.OutputSchema))
		}
	}

	// A body that does not fit it is a 400 naming the field.
	var out []float64
	err = c.Call(ctx, "scale", map[string]any{"values": "x"}, &out)
	fmt.Println(errors.Is(err, client.ErrBadRequest), err)
	// Output:
	// {"type":"object","properties":{"values":{"type":"array","items":{"type":"number"}},"factor":{"type":"number","default":2.0}},"additionalProperties":false,"required":["values"]}
	// {"type":"array","items":{"type":"number"}}
	// true 400 BadRequest: values: expected `array`, got `str`
}

func ExampleError() {
	c, err := client.Connect(natsURL, client.Options{})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	err = c.Call(ctx, "no_such_function", nil, nil)
	fmt.Println(errors.Is(err, client.ErrNotFound))
	var e *client.Error
	if errors.As(err, &e) {
		fmt.Println(e.Code, e.Type)
	}

	err = c.Call(ctx, "fail", nil, nil)
	if errors.As(err, &e) {
		// Any exception of the function: its class and message.
		fmt.Println(e.Code, e.Type, e.Message)
	}
	// Output:
	// true
	// 404 NotFound
	// 500 RuntimeError this function always fails
}
