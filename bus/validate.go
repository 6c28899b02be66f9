package bus

import (
	"strconv"
	"strings"
	"unicode"
	"unicode/utf16"
	"unicode/utf8"
	"unsafe"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/protocol"
)

// checkedHeaders are the request headers whose values the node reads and
// passes on (to a worker's proto string fields, to replies, to JetStream).
var checkedHeaders = []string{
	protocol.HeaderRequestID, protocol.HeaderSession, protocol.HeaderTimeout, protocol.HeaderHeartbeat, protocol.HeaderReplyTo, protocol.HeaderMsgID,
}

// checkHeaders refuses a request whose pyfleet headers the node could not
// carry safely: a value that is not UTF-8 cannot go into a proto string
// (marshalling it would break the worker's whole stream, not only the call),
// a control character could split a header block, and a long value would be
// copied into every reply and stored result. Names match without regard to
// case, as header() reads them.
func checkHeaders(h nats.Header) *call.Error {
	for key, vals := range h {
		for _, name := range checkedHeaders {
			if !strings.EqualFold(key, name) {
				continue
			}
			for _, v := range vals {
				if why := badHeaderValue(v); why != "" {
					return call.Errorf(call.CodeBadRequest, call.TypeBadRequest, "header %s: %s", name, why)
				}
			}
		}
	}
	return nil
}

// badHeaderValue says what is wrong with v as a pyfleet header value, or "".
func badHeaderValue(v string) string {
	if len(v) > protocol.MaxHeaderValue {
		return "value of " + strconv.Itoa(len(v)) + " bytes is over the limit of " + strconv.Itoa(protocol.MaxHeaderValue) + " bytes"
	}
	if !utf8.ValidString(v) {
		return "value is not valid UTF-8"
	}
	for _, r := range v {
		if unicode.IsControl(r) {
			return "value contains a control character"
		}
	}
	return ""
}

// The JSON rule. A body the node passes to a worker must be JSON that the
// worker's decoder (decode in python/pyfleet/codec.py, Python's json
// module) turns into a value it can also encode back, so that a hostile
// body costs a 400 here instead of a traceback and a 500 there. Go's
// json.Valid alone accepts four kinds of body Python cannot take:
//
//   - nesting deeper than Python's recursion limit (about 990 levels);
//     MaxJSONDepth is far under it, leaving the function stack to recurse on
//     what it was given;
//   - a number that overflows a float64 (1e999999): Python reads inf, which
//     it then refuses to encode;
//   - an integer with more than maxIntDigits digits: Python 3.11's
//     int_max_str_digits refuses to convert it (ValueError);
//   - text that is not UTF-8, or a \u escape that leaves half a surrogate
//     pair: Python cannot decode the first or encode the second.
//
// README.md ("Calling a function") states the rule for callers.
const (
	// MaxJSONDepth is how deeply arrays and objects may nest in a request body.
	MaxJSONDepth = 64
	// maxIntDigits is Python's default sys.get_int_max_str_digits().
	maxIntDigits = 4300
)

// checkJSON refuses a body that breaks the JSON rule above, so that no
// worker spends a round trip on it. An empty body is refused too: Python
// would read it as null, but an empty request is far more often a client
// that forgot its body. It is one pass over the body, without allocating
// unless it refuses.
func checkJSON(data []byte) *call.Error {
	if len(data) == 0 {
		return call.Errorf(call.CodeBadRequest, call.TypeBadRequest, "malformed JSON: empty body")
	}
	sc := jsonScanner{data: data}
	i := sc.value(sc.space(0), 0)
	if sc.err == nil {
		if i = sc.space(i); i < len(data) {
			sc.fail(i, "after the top-level value")
		}
	}
	return sc.err
}

type jsonScanner struct {
	data []byte
	err  *call.Error
}

// malformed records the first syntax error; what says what was expected.
func (sc *jsonScanner) fail(i int, what string) int {
	if sc.err != nil {
		return len(sc.data)
	}
	if i >= len(sc.data) {
		sc.err = call.Errorf(call.CodeBadRequest, call.TypeBadRequest, "malformed JSON: unexpected end of input")
	} else {
		sc.err = call.Errorf(call.CodeBadRequest, call.TypeBadRequest, "malformed JSON: invalid character %s at byte %d %s", quoteByte(sc.data[i]), i, what)
	}
	return len(sc.data)
}

// refuse records a breach of the rule by JSON that is well formed.
func (sc *jsonScanner) refuse(format string, args ...any) int {
	if sc.err == nil {
		sc.err = call.Errorf(call.CodeBadRequest, call.TypeBadRequest, "JSON not accepted: "+format, args...)
	}
	return len(sc.data)
}

func quoteByte(b byte) string {
	if b < utf8.RuneSelf {
		return strconv.QuoteRune(rune(b))
	}
	return "0x" + strconv.FormatUint(uint64(b), 16)
}

func (sc *jsonScanner) space(i int) int {
	for i < len(sc.data) {
		switch sc.data[i] {
		case ' ', '\t', '\n', '\r':
			i++
		default:
			return i
		}
	}
	return i
}

// value scans the value at i, inside depth containers, and returns the
// index after it; on error it returns len(data) with sc.err set.
func (sc *jsonScanner) value(i, depth int) int {
	d := sc.data
	if i >= len(d) {
		return sc.fail(i, "")
	}
	switch c := d[i]; {
	case c == '{':
		return sc.object(i, depth+1)
	case c == '[':
		return sc.array(i, depth+1)
	case c == '"':
		return sc.str(i)
	case c == '-' || ('0' <= c && c <= '9'):
		return sc.number(i)
	case c == 't':
		return sc.literal(i, "true")
	case c == 'f':
		return sc.literal(i, "false")
	case c == 'n':
		return sc.literal(i, "null")
	}
	return sc.fail(i, "looking for the beginning of a value")
}

func (sc *jsonScanner) literal(i int, lit string) int {
	for k := 0; k < len(lit); k++ {
		if i+k >= len(sc.data) || sc.data[i+k] != lit[k] {
			return sc.fail(i+k, "in literal "+lit)
		}
	}
	return i + len(lit)
}

func (sc *jsonScanner) object(i, depth int) int {
	if depth > MaxJSONDepth {
		return sc.refuse("nested deeper than %d levels at byte %d", MaxJSONDepth, i)
	}
	d := sc.data
	i = sc.space(i + 1)
	if i < len(d) && d[i] == '}' {
		return i + 1
	}
	for {
		if i >= len(d) || d[i] != '"' {
			return sc.fail(i, "looking for the beginning of an object key")
		}
		i = sc.space(sc.str(i))
		if i >= len(d) || d[i] != ':' {
			return sc.fail(i, "after an object key")
		}
		i = sc.space(sc.value(sc.space(i+1), depth))
		if i >= len(d) {
			return sc.fail(i, "")
		}
		switch d[i] {
		case ',':
			i = sc.space(i + 1)
		case '}':
			return i + 1
		default:
			return sc.fail(i, "after an object value")
		}
	}
}

func (sc *jsonScanner) array(i, depth int) int {
	if depth > MaxJSONDepth {
		return sc.refuse("nested deeper than %d levels at byte %d", MaxJSONDepth, i)
	}
	d := sc.data
	i = sc.space(i + 1)
	if i < len(d) && d[i] == ']' {
		return i + 1
	}
	for {
		i = sc.space(sc.value(i, depth))
		if i >= len(d) {
			return sc.fail(i, "")
		}
		switch d[i] {
		case ',':
			i = sc.space(i + 1)
		case ']':
			return i + 1
		default:
			return sc.fail(i, "after an array element")
		}
	}
}

// str scans the string starting with the quote at i.
func (sc *jsonScanner) str(i int) int {
	d := sc.data
	start := i
	i++
	for i < len(d) {
		c := d[i]
		switch {
		case c == '"':
			return i + 1
		case c == '\\':
			if i+1 >= len(d) {
				return sc.fail(i+1, "")
			}
			switch d[i+1] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
				i += 2
			case 'u':
				r, ok := hex4(d, i+2)
				if !ok {
					return sc.fail(i+2, "in \\u escape")
				}
				i += 6
				if utf16.IsSurrogate(r) {
					// Only a high half followed by an escaped low half makes a
					// character; Python keeps any other half as a lone
					// surrogate that it cannot encode.
					var lo rune
					if r < 0xdc00 && i+1 < len(d) && d[i] == '\\' && d[i+1] == 'u' {
						lo, ok = hex4(d, i+2)
					}
					if r >= 0xdc00 || !ok || lo < 0xdc00 || lo > 0xdfff {
						return sc.refuse("string at byte %d has an unpaired surrogate escape \\u%04x", start, r)
					}
					i += 6
				}
			default:
				return sc.fail(i+1, "in string escape code")
			}
		case c < 0x20:
			return sc.fail(i, "in string literal")
		case c < utf8.RuneSelf:
			i++
		default:
			r, size := utf8.DecodeRune(d[i:])
			if r == utf8.RuneError && size == 1 {
				return sc.refuse("string at byte %d is not valid UTF-8 (byte %d)", start, i)
			}
			i += size
		}
	}
	return sc.fail(i, "")
}

// hex4 reads the four hex digits of a \u escape at i.
func hex4(d []byte, i int) (rune, bool) {
	if i+4 > len(d) {
		return 0, false
	}
	var r rune
	for _, c := range d[i : i+4] {
		switch {
		case '0' <= c && c <= '9':
			c -= '0'
		case 'a' <= c && c <= 'f':
			c -= 'a' - 10
		case 'A' <= c && c <= 'F':
			c -= 'A' - 10
		default:
			return 0, false
		}
		r = r<<4 | rune(c)
	}
	return r, true
}

// number scans the number at i: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
func (sc *jsonScanner) number(i int) int {
	d := sc.data
	start := i
	if d[i] == '-' {
		i++
	}
	digits := i
	switch {
	case i < len(d) && d[i] == '0':
		i++
	case i < len(d) && '1' <= d[i] && d[i] <= '9':
		for i < len(d) && '0' <= d[i] && d[i] <= '9' {
			i++
		}
	default:
		return sc.fail(i, "in numeric literal")
	}
	intDigits := i - digits
	float := false
	if i < len(d) && d[i] == '.' {
		float = true
		i++
		if i >= len(d) || d[i] < '0' || d[i] > '9' {
			return sc.fail(i, "after decimal point in numeric literal")
		}
		for i < len(d) && '0' <= d[i] && d[i] <= '9' {
			i++
		}
	}
	exp := false
	if i < len(d) && (d[i] == 'e' || d[i] == 'E') {
		float, exp = true, true
		i++
		if i < len(d) && (d[i] == '+' || d[i] == '-') {
			i++
		}
		if i >= len(d) || d[i] < '0' || d[i] > '9' {
			return sc.fail(i, "in exponent of numeric literal")
		}
		for i < len(d) && '0' <= d[i] && d[i] <= '9' {
			i++
		}
	}
	switch {
	case !float && intDigits > maxIntDigits:
		return sc.refuse("integer at byte %d has %d digits, over the limit of %d", start, intDigits, maxIntDigits)
	// Without an exponent a float needs over 308 integer digits to
	// overflow: only then, or with an exponent, is it worth parsing.
	case float && (exp || intDigits > 300):
		// An underflow is no error: Python reads 0.0 too.
		if _, err := strconv.ParseFloat(unsafe.String(&d[start], i-start), 64); err != nil {
			return sc.refuse("number at byte %d is beyond the range of a 64-bit float", start)
		}
	}
	return i
}
