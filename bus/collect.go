package bus

import (
	"sync"

	"github.com/pyfleet/pyfleet/call"
)

// collector gathers a streamed job's items as they come and refuses the one
// that would make the joined result larger than limit: a generator that
// never ends costs the node one result's worth of memory, not all of it.
type collector struct {
	raw   bool
	limit int

	mu     sync.Mutex
	chunks [][]byte
	size   int // of the joined result so far
	worker string
	err    *call.Error
}

func (c *collector) add(ch call.Chunk) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return c.err
	}
	size := c.size + len(ch.Data)
	if !c.raw {
		if len(c.chunks) == 0 {
			size += 2 // [ and ]
		} else {
			size++ // ,
		}
	}
	if size > c.limit {
		c.err = call.Errorf(call.CodeTooLarge, call.TypeTooLarge, "streamed result is over the limit of %d bytes after %d items (%d bytes); the call was cancelled",
			c.limit, len(c.chunks), c.size)
		c.err.Worker = ch.Worker
		c.chunks = nil // the job is lost: free it now
		return c.err
	}
	c.size = size
	c.chunks = append(c.chunks, ch.Data)
	c.worker = ch.Worker
	return nil
}

func (c *collector) failure() *call.Error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

func (c *collector) join() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return joinChunks(c.chunks, c.raw, c.size)
}

// joinChunks makes one result of a streamed job's chunks; size is its
// length, known beforehand so that the result is allocated once.
func joinChunks(chunks [][]byte, raw bool, size int) []byte {
	b := make([]byte, 0, size)
	if raw {
		for _, c := range chunks {
			b = append(b, c...)
		}
		return b
	}
	b = append(b, '[')
	for i, c := range chunks {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, c...)
	}
	return append(b, ']')
}
