package bus

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"strconv"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/nats-io/nats.go"

	"github.com/pyfleet/pyfleet/call"
	"github.com/pyfleet/pyfleet/protocol"
)

func TestCheckHeaders(t *testing.T) {
	ok := []nats.Header{
		nil,
		{protocol.HeaderRequestID: {strings.Repeat("r", protocol.MaxHeaderValue)}},
		{protocol.HeaderSession: {"café-☕"}, "X-Other": {"\xff\x00 not ours"}},
		{protocol.HeaderTimeout: {"1500"}, protocol.HeaderHeartbeat: {"200"}, protocol.HeaderReplyTo: {"app.results"}, protocol.HeaderMsgID: {"job-1"}},
	}
	for _, h := range ok {
		if err := checkHeaders(h); err != nil {
			t.Errorf("%v: %v", h, err)
		}
	}
	bad := map[string]string{
		"\xff\xfe": "not valid UTF-8",
		strings.Repeat("r", protocol.MaxHeaderValue+1):   "over the limit of 256 bytes",
		strings.Repeat("é", protocol.MaxHeaderValue/2+1): "over the limit of 256 bytes",
		"a\x00b":   "control character",
		"a\tb":     "control character",
		"a\x7fb":   "control character",
		"a\u0085b": "control character",
	}
	for _, name := range checkedHeaders {
		for v, why := range bad {
			for _, key := range []string{name, strings.ToLower(name)} {
				// The bad value hides behind a good one: every value counts.
				err := checkHeaders(nats.Header{key: {"good", v}})
				if err == nil || err.Code != call.CodeBadRequest || err.Type != call.TypeBadRequest {
					t.Errorf("%s: %q: %v, want 400", key, v, err)
					continue
				}
				if !strings.Contains(err.Message, "header "+name+": ") || !strings.Contains(err.Message, why) {
					t.Errorf("%s: %q: message %q does not name the header and %q", key, v, err.Message, why)
				}
				if strings.Contains(err.Message, v) {
					t.Errorf("%s: message %q echoes the bad value", key, err.Message)
				}
			}
		}
	}
}

func TestCheckTimeout(t *testing.T) {
	const def, max = 60_000, 3_600_000
	for v, want := range map[string]int64{"": def, "1": 1, "3600000": max} {
		d, err := checkTimeout(nats.Header{protocol.HeaderTimeout: {v}}, def*1e6, max*1e6)
		if err != nil || d.Milliseconds() != want {
			t.Errorf("%q: %v %v, want %d ms", v, d, err, want)
		}
	}
	for _, v := range []string{"3600001", "4294967297", strconv.FormatInt(1<<62, 10), "9223372036854775807", "99999999999999999999"} {
		d, err := checkTimeout(nats.Header{protocol.HeaderTimeout: {v}}, def*1e6, max*1e6)
		if err == nil || d != 0 || err.Code != call.CodeBadRequest || !strings.Contains(err.Message, protocol.HeaderTimeout) {
			t.Errorf("%q: %v %v, want a 400 naming the header", v, d, err)
		}
	}
	_, err := checkTimeout(nats.Header{protocol.HeaderTimeout: {"3600001"}}, def*1e6, max*1e6)
	if !strings.Contains(err.Message, "3600000") || !strings.Contains(err.Message, "--max-timeout") {
		t.Errorf("message %q does not give the limit", err.Message)
	}
}

// jsonCases are bodies Python cannot take although json.Valid accepts them,
// with what the refusal must say, then bodies at the very edge of the rule
// that must pass.
var (
	jsonRefused = map[string]string{
		strings.Repeat("[", MaxJSONDepth+1) + strings.Repeat("]", MaxJSONDepth+1):               "nested deeper than 64 levels",
		strings.Repeat(`{"a":`, MaxJSONDepth+1) + "1" + strings.Repeat("}", MaxJSONDepth+1):     "nested deeper than 64 levels",
		`{"a":[` + strings.Repeat("[", MaxJSONDepth) + strings.Repeat("]", MaxJSONDepth) + `]}`: "nested deeper than 64 levels",
		strings.Repeat("[", 100_000) + strings.Repeat("]", 100_000):                             "nested deeper than 64 levels",
		`1e999999`:                                 "beyond the range of a 64-bit float",
		`[-1e309]`:                                 "beyond the range of a 64-bit float",
		`1.7976931348623159e308`:                   "beyond the range of a 64-bit float",
		strings.Repeat("9", 400) + ".0":            "beyond the range of a 64-bit float",
		strings.Repeat("1", maxIntDigits+1):        "has 4301 digits, over the limit of 4300",
		`{"n":-` + strings.Repeat("1", 5000) + `}`: "has 5000 digits, over the limit of 4300",
		`"` + "\xff\xfe" + `"`:                     "not valid UTF-8",
		`{"` + "\xed\xa0\x80" + `":1}`:             "not valid UTF-8",
		`"ok` + "\xc3" + `"`:                       "not valid UTF-8",
		`"\ud800"`:                                 `unpaired surrogate escape \ud800`,
		`"\udc00\ud800"`:                           `unpaired surrogate escape \udc00`,
		`"\ud800\u0041"`:                           `unpaired surrogate escape \ud800`,
		`"\ud800x"`:                                `unpaired surrogate escape \ud800`,
		`["\uDBFF\n"]`:                             `unpaired surrogate escape \udbff`,
	}
	jsonAccepted = []string{
		strings.Repeat("[", MaxJSONDepth) + strings.Repeat("]", MaxJSONDepth),
		strings.Repeat(`{"a":`, MaxJSONDepth) + "1" + strings.Repeat("}", MaxJSONDepth),
		strings.Repeat("1", maxIntDigits),
		"-" + strings.Repeat("1", maxIntDigits),
		strings.Repeat("1", maxIntDigits+1) + "e-5000", // a float: Python reads it as one
		`1.7976931348623157e308`, `-1.7976931348623158e308`, `1e-999999`, `0.0`, `-0`, `0e0`, `1E+2`,
		strings.Repeat("9", 300) + ".5",
		`"\ud83d\ude00 \uD83D\uDE00 😀 é \u00e9 \u0000 \/"`,
		` {"a" : [ 1 , true , false , null , "x" , { } , [ ] ] } ` + "\t\r\n",
		`"` + "\x7f" + `"`,
	}
	jsonMalformed = []string{
		``, ` `, `{`, `{"a":`, `nope`, `[1,]`, `{"a":1,}`, `{"a" 1}`, `{1:2}`, `[1 2]`, `01`, `1.`, `.5`, `1e`,
		`-`, `+1`, `1e+`, `tru`, `nul`, `"abc`, `"\x"`, `"\u12"`, `"\u12g4"`, "\"a\nb\"", "\"\x01\"",
		`NaN`, `Infinity`, `-Infinity`, "\ufeff1", `1 2`, `{}x`, `"\`, `[`, `]`, `}`,
	}
)

func TestCheckJSON(t *testing.T) {
	for body, why := range jsonRefused {
		if !json.Valid([]byte(body)) && len(body) < 1000 {
			t.Errorf("%.40q: not even valid JSON to Go: the case tests nothing", body)
		}
		err := checkJSON([]byte(body))
		if err == nil || err.Code != call.CodeBadRequest || err.Type != call.TypeBadRequest {
			t.Errorf("%.40q: %v, want 400", body, err)
			continue
		}
		if !strings.HasPrefix(err.Message, "JSON not accepted: ") || !strings.Contains(err.Message, why) {
			t.Errorf("%.40q: message %q, want one with %q", body, err.Message, why)
		}
		if len(err.Message) > 200 {
			t.Errorf("%.40q: message of %d bytes echoes the body", body, len(err.Message))
		}
	}
	for _, body := range jsonAccepted {
		if err := checkJSON([]byte(body)); err != nil {
			t.Errorf("%.40q: %v", body, err)
		}
	}
	for _, body := range jsonMalformed {
		if json.Valid([]byte(body)) {
			t.Fatalf("%q is valid JSON to Go: the case tests nothing", body)
		}
		err := checkJSON([]byte(body))
		if err == nil || err.Code != call.CodeBadRequest || !strings.HasPrefix(err.Message, "malformed JSON: ") {
			t.Errorf("%q: %v, want 400 malformed JSON", body, err)
		}
	}
}

// pythonCanTake is the JSON rule written a second way, on Go's own
// decoder, for the fuzz targets to hold checkJSON to: whether Python's json
// decodes body into a value it can encode again. It returns the breach, or
// "" when there is none; ok is false if body is not JSON at all.
func pythonCanTake(body []byte) (breach string, ok bool) {
	if !json.Valid(body) {
		return "", false
	}
	if !utf8.Valid(body) {
		return "not valid UTF-8", true
	}
	if loneSurrogate(body) {
		return "unpaired surrogate", true
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	depth := 0
	for {
		tok, err := dec.Token()
		if errors.Is(err, io.EOF) {
			return "", true
		}
		if err != nil {
			// Only Go's own nesting limit (10000) makes a valid body fail.
			return "nested deeper than", true
		}
		switch tok := tok.(type) {
		case json.Delim:
			if tok == '[' || tok == '{' {
				if depth++; depth > MaxJSONDepth {
					return "nested deeper than", true
				}
			} else {
				depth--
			}
		case json.Number:
			s := string(tok)
			if strings.ContainsAny(s, ".eE") {
				if _, err := strconv.ParseFloat(s, 64); err != nil {
					return "beyond the range of a 64-bit float", true
				}
			} else if len(strings.TrimPrefix(s, "-")) > maxIntDigits {
				return "over the limit of 4300", true
			}
		}
	}
}

// loneSurrogate reports a \u escape of half a surrogate pair that is not
// followed, or preceded, by its other half: the decoder above turns them
// into U+FFFD and cannot tell.
func loneSurrogate(body []byte) bool {
	s := string(body)
	for i := 0; i+6 <= len(s); i++ {
		if s[i] != '\\' {
			continue
		}
		if s[i+1] != 'u' {
			i++ // an escaped character, maybe a backslash
			continue
		}
		r, err := strconv.ParseUint(s[i+2:i+6], 16, 16)
		if err != nil || r < 0xd800 || r > 0xdfff {
			i += 5
			continue
		}
		if r >= 0xdc00 || i+12 > len(s) || s[i+6:i+8] != `\u` {
			return true
		}
		lo, err := strconv.ParseUint(s[i+8:i+12], 16, 16)
		if err != nil || lo < 0xdc00 || lo > 0xdfff {
			return true
		}
		i += 11
	}
	return false
}

func TestPythonCanTakeAgrees(t *testing.T) {
	for body, why := range jsonRefused {
		if !json.Valid([]byte(body)) {
			continue // deeper than Go's own limit
		}
		if breach, ok := pythonCanTake([]byte(body)); !ok || breach == "" || !strings.Contains(why, breach) && !strings.Contains(breach, "nested") {
			t.Errorf("%.40q: oracle says %q %v, want %q", body, breach, ok, why)
		}
	}
	for _, body := range jsonAccepted {
		if breach, ok := pythonCanTake([]byte(body)); !ok || breach != "" {
			t.Errorf("%.40q: oracle says %q %v", body, breach, ok)
		}
	}
}

// benchBodies are a typical small request and a 100 KB one of the same
// kinds of values.
func benchBodies() map[string][]byte {
	small := []byte(`{"id":12345,"name":"Ada Lovelace","tags":["math","poetry"],"score":98.5,"ok":true}`)
	var big bytes.Buffer
	big.WriteString(`{"items":[`)
	for i := 0; big.Len() < 100_000; i++ {
		if i > 0 {
			big.WriteByte(',')
		}
		big.WriteString(`{"id":` + strconv.Itoa(i) + `,"name":"item number ` + strconv.Itoa(i) +
			` – café","price":` + strconv.Itoa(i*7) + `.25,"ratio":1.5e-3,"tags":["a","b\n"],"nested":{"x":[1,2,3],"y":null}}`)
	}
	big.WriteString(`]}`)
	return map[string][]byte{"100B": small, "100KB": big.Bytes()}
}

func BenchmarkCheckJSON(b *testing.B) {
	for name, body := range benchBodies() {
		b.Run("checkJSON/"+name, func(b *testing.B) {
			b.SetBytes(int64(len(body)))
			b.ReportAllocs()
			for b.Loop() {
				if err := checkJSON(body); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run("json.Valid/"+name, func(b *testing.B) {
			b.SetBytes(int64(len(body)))
			b.ReportAllocs()
			for b.Loop() {
				if !json.Valid(body) {
					b.Fatal("invalid")
				}
			}
		})
	}
}
