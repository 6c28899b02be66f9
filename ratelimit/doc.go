// Package ratelimit enforces the rate limits functions declare
// (@app.function(rate_limit="100/s")) across every node of a pool.
//
// Each limited function has one key in a JetStream key-value bucket
// (protocol.RateBucket) holding the time its next invocation may start
// (a GCRA "theoretical arrival time"). An invocation reserves the slot at
// that time, or now if that is past, by a compare-and-set that moves the
// key one interval on, and waits for its slot; a node that loses the race
// reads the key again. The slots are spaced exactly one interval apart
// whichever node takes them, so the pool as a whole starts no more than the
// limit, with no burst, and needs no count of its nodes. Without
// JetStream, or when the bucket fails, each node keeps the same reservation
// in memory, and the limit is then per node.
//
// Limiter.Wrap puts the limits in front of the pool's call.Handler. A call
// of a function without a limit goes straight through, started without a
// goroutine where the pool can (call.Starter).
package ratelimit
