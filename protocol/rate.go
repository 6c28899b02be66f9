package protocol

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// ParseRate reads a function's rate limit, "<count>/<unit>" with unit s, m
// or h ("100/s", "30/m", "0.5/s"), as the interval between two starts. The
// count must be positive, and the interval at least a microsecond.
func ParseRate(s string) (time.Duration, error) {
	count, unit, ok := strings.Cut(strings.TrimSpace(s), "/")
	var per time.Duration
	switch strings.TrimSpace(unit) {
	case "s":
		per = time.Second
	case "m":
		per = time.Minute
	case "h":
		per = time.Hour
	default:
		ok = false
	}
	n, err := strconv.ParseFloat(strings.TrimSpace(count), 64)
	if !ok || err != nil || !(n > 0) || n > 1e9 {
		return 0, fmt.Errorf("rate limit %q: want a positive number of calls per s, m or h, such as \"100/s\"", s)
	}
	return time.Duration(float64(per) / n), nil
}

// MetaRateLimit is the function endpoint metadata that gives the
// function's rate limit as its app declared it ("100/s"), absent without
// one.
const MetaRateLimit = "rate_limit"

// RateBucket names the key-value bucket that holds the pools' rate limits
// under prefix ("" means DefaultPrefix): PYFLEET_RATE, or <PREFIX>_RATE,
// beside StatusBucket. Its key for a function is StatusKey(pool, function).
func RateBucket(prefix string) string {
	return strings.TrimSuffix(StatusBucket(prefix), "_STATUS") + "_RATE"
}
