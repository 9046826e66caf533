package legacy

// Starting `tailnetd dev` for these tests through the shared process harness
// (tailnetd.test/interop/harness: binary, announcement, log tail, SIGTERM contract). Nothing here
// speaks a coordination protocol.

import (
	"testing"

	"tailnetd.test/interop/harness"
)

// logFilter is tailnetd's log filter (TAILNETD_TEST_LOG overrides it).
const logFilter = "info,coordinator=debug"

func TestMain(m *testing.M) { harness.Main(m) }

// startDev runs `tailnetd dev` on ephemeral loopback ports and returns its announcement, which
// must carry the generated agent and its credentials. The process is stopped (SIGTERM, must exit
// 0) when the test ends; if the test failed, tailnetd's last log lines are printed with the
// test's name.
func startDev(t *testing.T) harness.Announcement {
	t.Helper()
	return harness.Start(t, harness.Options{
		Args:             []string{"dev", "--http-addr", "127.0.0.1:0", "--stun-addr", "127.0.0.1:0"},
		LogFilter:        logFilter,
		Require:          []string{"base_url", "agent_id", "agent_token", "client_token"},
		RequireCleanExit: true,
	}).Announcement()
}
