// Package harness runs the tailnetd binary for the Go interop suites in interop/*: it is the one
// place that knows how a suite gets the binary and drives it as a black box.
//
// It owns:
//   - finding the binary: $TAILNETD_BIN, or `cargo build -p tailnetd` once per test binary at the
//     repository root ([Main], [Binary]);
//   - the process contract: start with the subcommand and flags a suite chooses, read the one JSON
//     announcement line from stdout ([Announcement]) and check the fields the suite relies on,
//     SIGTERM drains and exits 0 ([Start], [Process]);
//   - tailnetd's log: the last lines of stderr in a [Ring], printed with the case name when a test
//     or subtest fails ([DumpLogsOnFailure]);
//   - small waiting helpers shared by the suites ([FreeTCPAddr], [FreeUDPAddr], [WaitFor]).
//
// It speaks no protocol (that is left to the real Tailscale and Coder libraries in each suite)
// and imports only the standard library, so that a suite that uses it pulls no second copy of
// tailscale.com or Coder.
//
// Environment knobs:
//   - TAILNETD_BIN: the binary under test (otherwise cargo builds it; CARGO_TARGET_DIR is honoured);
//   - TAILNETD_TEST_LOG: tailnetd's log filter, passed as TAILNETD_LOG (otherwise each suite's
//     default);
//   - TAILNETD_TEST_DUMP_LOGS=1: keep the whole log and print it for passing cases too.
package harness
