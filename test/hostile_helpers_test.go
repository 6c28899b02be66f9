package test

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/protocol"
)

// nodeStats asks the node's micro service for its pool figures (workers,
// busy, queued), as `nats micro stats pyfleet` shows them.
func nodeStats(t *testing.T, nc *nats.Conn, node string) (workers, busy, queued int) {
	t.Helper()
	inbox := nc.NewRespInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := nc.PublishRequest("$SRV.STATS."+protocol.ServiceName, inbox, nil); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		m, err := sub.NextMsg(time.Until(deadline))
		if err != nil {
			break
		}
		var st struct {
			Metadata  map[string]string `json:"metadata"`
			Endpoints []struct {
				Data struct {
					Node struct {
						Workers int `json:"workers"`
						Busy    int `json:"busy"`
						Queued  int `json:"queued"`
					} `json:"node"`
				} `json:"data"`
			} `json:"endpoints"`
		}
		if json.Unmarshal(m.Data, &st) != nil || st.Metadata["node"] != node || len(st.Endpoints) == 0 {
			continue
		}
		d := st.Endpoints[0].Data.Node
		return d.Workers, d.Busy, d.Queued
	}
	t.Fatalf("node %s did not answer $SRV.STATS within 2 s", node)
	return 0, 0, 0
}

// assertStillServing is how every hostile test ends: after whatever was
// thrown at the node, echo answers within 1 s and the node has wantWorkers
// live workers again (a worker it had to replace counts once its
// replacement is ready; the test checks the events that say so). Leaked
// processes are checked by startNode's cleanup.
func assertStillServing(t *testing.T, n *nodeProc, nc *nats.Conn, wantWorkers int) {
	t.Helper()
	m, err := nc.Request(protocol.Subjects{}.Request("default", "echo"), []byte(`{"still":"here"}`), time.Second)
	if err != nil {
		t.Fatalf("echo after the attack: %v\n%s", err, n.log())
	}
	if e := protocol.ReplyError(m.Header, m.Data); e != nil {
		t.Fatalf("echo after the attack: %d %s: %s", e.Code, e.Type, e.Message)
	}
	if string(m.Data) != `{"still":"here"}` {
		t.Fatalf("echo after the attack answered %q", m.Data)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		workers, _, _ := nodeStats(t, nc, n.name)
		if workers == wantWorkers {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("node has %d live workers, want %d", workers, wantWorkers)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
