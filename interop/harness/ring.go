package harness

import (
	"fmt"
	"regexp"
	"strings"
	"sync"
	"time"
)

// ansiEscape matches the colour codes a log line may carry despite NO_COLOR.
var ansiEscape = regexp.MustCompile(`\x1b\[[0-9;]*m`)

// Ring keeps the last lines written to it (tailnetd's log, or a suite's client log), safe for
// concurrent use. Lines are stored without ANSI colour codes.
type Ring struct {
	mu    sync.Mutex
	lines []string // circular, len == capacity
	next  int      // where the next line goes
	total int      // lines ever added
}

// NewRing returns a Ring that keeps the last capacity lines (at least one).
func NewRing(capacity int) *Ring {
	return &Ring{lines: make([]string, max(capacity, 1))}
}

// Add keeps line.
func (r *Ring) Add(line string) {
	line = ansiEscape.ReplaceAllString(line, "")
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lines[r.next] = line
	r.next = (r.next + 1) % len(r.lines)
	r.total++
}

// Logf adds one line stamped with the wall clock (HH:MM:SS.mmm). It never touches a testing.T,
// so it may be handed to client libraries whose goroutines outlive the test.
func (r *Ring) Logf(format string, args ...any) {
	r.Add(time.Now().Format("15:04:05.000 ") + strings.TrimRight(fmt.Sprintf(format, args...), "\n"))
}

// Lines returns the kept lines, oldest first.
func (r *Ring) Lines() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.keptLocked()
}

// Total is the number of lines ever added, kept or not.
func (r *Ring) Total() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.total
}

// Tail returns the last n kept lines (all of them, if fewer are kept) and how many lines were
// added before them.
func (r *Ring) Tail(n int) (lines []string, earlier int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	lines = r.keptLocked()
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return lines, r.total - len(lines)
}

// keptLocked copies the kept lines, oldest first; r.mu must be held.
func (r *Ring) keptLocked() []string {
	if r.total < len(r.lines) {
		return append([]string(nil), r.lines[:r.next]...)
	}
	return append(append([]string(nil), r.lines[r.next:]...), r.lines[:r.next]...)
}

// String renders the kept lines indented by two spaces, one per line, after a note of how many
// earlier lines were dropped.
func (r *Ring) String() string {
	lines, earlier := r.Tail(len(r.lines))
	var b strings.Builder
	if earlier > 0 {
		fmt.Fprintf(&b, "  ... (%d earlier lines)\n", earlier)
	}
	for _, l := range lines {
		b.WriteString("  ")
		b.WriteString(l)
		b.WriteByte('\n')
	}
	return b.String()
}
