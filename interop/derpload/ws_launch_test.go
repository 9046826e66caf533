//go:build !ts_debug_websockets

package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"tailnetd.test/interop/harness"
)

// TestWebSocket re-runs the WebSocket cases of TestRunAgainstTailnetd in a child `go test` with
// Tailscale's build tag ts_debug_websockets (derphttp compiles its WebSocket dialer only with
// it), against the same tailnetd binary. Its output is shown only on failure.
func TestWebSocket(t *testing.T) {
	bin := harness.Binary(t)
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	args := []string{"test", "-count=1", "-tags", "ts_debug_websockets", "-v",
		"-run", "^TestRunAgainstTailnetd$/^wss?-closed-loop$", "."}
	cmd := exec.Command(goBin, args...)
	cmd.Env = append(os.Environ(), "TAILNETD_BIN="+bin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("WebSocket cases failed (%s %v): %v\n%s", goBin, args, err, out)
	}
	// Both cases must have run, not been skipped.
	for _, name := range []string{"ws-closed-loop", "wss-closed-loop"} {
		if !strings.Contains(string(out), "--- PASS: TestRunAgainstTailnetd/"+name) {
			t.Fatalf("%s did not pass in the tagged build:\n%s", name, out)
		}
	}
}

// TestWebSocketNeedsTag: without the tag, -ws is refused, never silently plain DERP.
func TestWebSocketNeedsTag(t *testing.T) {
	_, err := run(context.Background(), config{url: "http://127.0.0.1:1/derp", pairs: 1, size: 1400, ws: true})
	if err == nil || !strings.Contains(err.Error(), "ts_debug_websockets") {
		t.Fatalf("run with -ws in an untagged build: %v", err)
	}
}
