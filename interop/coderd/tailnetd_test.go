package coderdinterop

// The tailnetd process of these tests, `tailnetd serve --upstream ...`, through the shared
// interop harness (tailnetd.test/interop/harness: binary, announcement, log tail printed when a
// test fails, SIGTERM contract, restart on the same address).

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"tailnetd.test/interop/harness"
)

// upstreamBridgeArgs are the extra flags for the coderd bridge: TAILNETD_UPSTREAM_BRIDGE=off runs
// tailnetd with the bridge switched off (to show which features depend on it); unset or "on"
// leaves tailnetd's default.
func upstreamBridgeArgs(t testing.TB) []string {
	switch v := os.Getenv("TAILNETD_UPSTREAM_BRIDGE"); v {
	case "", "on":
		return nil
	case "off":
		return []string{"--upstream-bridge=false"}
	default:
		t.Fatalf("TAILNETD_UPSTREAM_BRIDGE=%q: want on or off", v)
		return nil
	}
}

type tailnetdProcess struct {
	*harness.Process
	t testing.TB
}

// startTailnetdServe runs `tailnetd serve` on addr (fixed, so a restart comes back on it) with
// coderd at upstreamURL, a key file (the relay keeps its identity across restarts), no STUN.
func startTailnetdServe(t *testing.T, addr, upstreamURL string, extra ...string) *tailnetdProcess {
	t.Helper()
	args := []string{"serve",
		"--http-addr", addr,
		"--stun-addr", "",
		"--upstream", upstreamURL,
		"--key-file", filepath.Join(t.TempDir(), "derp.key"),
		// metric() reads /metrics from the base URL; no fixed metrics port (tests run at once).
		"--metrics-addr", "",
		"--metrics-on-public-listener", "true",
	}
	args = append(args, upstreamBridgeArgs(t)...)
	args = append(args, extra...)
	p := harness.Start(t, harness.Options{
		Args:             args,
		LogFilter:        "info,coordinator=debug",
		Require:          []string{"base_url"},
		StartTimeout:     30 * time.Second,
		StopTimeout:      15 * time.Second,
		RequireCleanExit: true,
	})
	return &tailnetdProcess{Process: p, t: t}
}

// restart stops tailnetd (it must exit cleanly) and starts it again on the same address.
func (p *tailnetdProcess) restart() { p.Restart(p.t) }

func (p *tailnetdProcess) announcement() harness.Announcement { return p.Announcement() }

// metric returns the lines of tailnetd's /metrics for one metric (for failure messages).
func (p *tailnetdProcess) metric(ctx context.Context, name string) string {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.announcement().BaseURL+"/metrics", nil)
	if err != nil {
		return err.Error()
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Sprintf("/metrics: %v", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var lines []string
	for _, l := range strings.Split(string(body), "\n") {
		if strings.HasPrefix(l, name) {
			lines = append(lines, l)
		}
	}
	if len(lines) == 0 {
		return name + " absent from /metrics"
	}
	return strings.Join(lines, "; ")
}
