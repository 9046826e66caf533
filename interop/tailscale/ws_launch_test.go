//go:build !ts_debug_websockets

package tailscale

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"

	"tailnetd.test/interop/harness"
)

// TestWebSocket runs the WebSocket cases (ws_test.go). derphttp only
// compiles its WebSocket dialer with the build tag ts_debug_websockets (and
// only uses it when TS_DEBUG_DERP_WS_CLIENT is set), so this re-runs this
// package with that tag in a child `go test`, against the same tailnetd
// binary. Its output is shown only on failure.
func TestWebSocket(t *testing.T) {
	bin := harness.Binary(t)
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	args := []string{"test", "-count=1", "-tags", "ts_debug_websockets", "-run", "^TestWebSocketTagged$", "."}
	if testing.Verbose() {
		args = append(args, "-v")
	}
	cmd := exec.Command(goBin, args...)
	cmd.Env = append(os.Environ(), "TAILNETD_BIN="+bin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("WebSocket cases failed (%s %v): %v\n%s", goBin, args, err, out)
	}
	if testing.Verbose() {
		t.Logf("%s", out)
	}
}
