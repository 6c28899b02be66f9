package bus

import (
	"regexp"
	"strings"
)

// lastToken returns what follows the last dot of subject.
func lastToken(subject string) string {
	return subject[strings.LastIndexByte(subject, '.')+1:]
}

// nameBad matches what JetStream stream and consumer names and micro
// endpoint names may not contain (dots, wildcards, white space, path
// separators), and a little more.
var nameBad = regexp.MustCompile(`[^A-Za-z0-9_-]`)

// safeName makes s fit those names; the subjects keep the real one.
func safeName(s string) string {
	return nameBad.ReplaceAllString(s, "_")
}
