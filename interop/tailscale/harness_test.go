package tailscale

// Harness: starts `tailnetd derp` through the shared process harness
// (tailnetd.test/interop/harness: binary, announcement, log tail, SIGTERM
// contract), keeps the Go clients' log in a ring and prints it with the case
// name when a test fails, and makes self-signed TLS certificates. It only
// drives the real Tailscale client libraries; it never works around server
// behaviour.

import (
	"net"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"tailnetd.test/interop/harness"
)

const (
	// readyTimeout bounds the wait for tailnetd's JSON readiness line.
	readyTimeout = 20 * time.Second
	// stopTimeout bounds the wait for tailnetd to exit after SIGTERM.
	stopTimeout = 10 * time.Second
	// logFilter is tailnetd's log filter: debug, so that a failing case shows
	// what the server did (TAILNETD_TEST_LOG overrides it).
	logFilter = "debug,hyper=info,rustls=info,tungstenite=info,tokio_tungstenite=info,h2=info"
)

func TestMain(m *testing.M) { harness.Main(m) }

// serverOpts configures one tailnetd process.
type serverOpts struct {
	httpAddr  string // default 127.0.0.1:0
	stunAddr  string // default 127.0.0.1:0
	httpsAddr string // set together with tls
	tls       *harness.Cert
	keyFile   string // default <tmp>/derp.key
	metrics   bool   // serve /metrics on a loopback port of its own (announced as metrics_addr)
	extraArgs []string
}

// tailnetd is one running `tailnetd derp` process.
type tailnetd struct {
	*harness.Process
	opts serverOpts
	info harness.Announcement // the readiness line
}

// env is the per-test context: the Go clients' log and a directory.
type env struct {
	t         *testing.T
	clientLog *harness.Ring
	dir       string
}

// newEnv registers, before any server starts (so that it runs last), a
// cleanup that prints the Go client log if the test failed.
func newEnv(t *testing.T) *env {
	t.Helper()
	e := &env{t: t, clientLog: harness.NewRing(300), dir: t.TempDir()}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("FAILED CASE %s: Go client log:\n%s", t.Name(), e.clientLog.String())
		}
	})
	return e
}

// logf is handed to the Go clients; it never touches testing.T so it is
// safe to call from goroutines that outlive the test.
func (e *env) logf(format string, args ...any) { e.clientLog.Logf(format, args...) }

// start launches tailnetd with opts and waits for its readiness line, which
// must carry the DERP key and every address that was asked for.
func (e *env) start(opts serverOpts) *tailnetd {
	t := e.t
	t.Helper()
	if opts.httpAddr == "" {
		opts.httpAddr = "127.0.0.1:0"
	}
	if opts.stunAddr == "" {
		opts.stunAddr = "127.0.0.1:0"
	}
	if opts.keyFile == "" {
		opts.keyFile = filepath.Join(e.dir, "derp.key")
	}
	// Several relays run at once: none binds the fixed default metrics port.
	metricsAddr := ""
	require := []string{"derp_public_key", "stun_addr"}
	if opts.metrics {
		metricsAddr = "127.0.0.1:0"
		require = append(require, "metrics_addr")
	}
	args := []string{"derp",
		"--http-addr", opts.httpAddr,
		"--stun-addr", opts.stunAddr,
		"--key-file", opts.keyFile,
		"--metrics-addr", metricsAddr,
	}
	args = append(args, opts.extraArgs...)
	if opts.tls != nil {
		if opts.httpsAddr == "" {
			opts.httpsAddr = "127.0.0.1:0"
		}
		args = append(args,
			"--https-addr", opts.httpsAddr,
			"--tls-cert", opts.tls.CertFile,
			"--tls-key", opts.tls.KeyFile)
		require = append(require, "https_addr")
	}
	// A non-zero exit at cleanup is not judged here (TestRestart checks the
	// SIGTERM drain itself): tailnetd installs its SIGTERM handler only after
	// printing the readiness line, so a case that ends within milliseconds of
	// the start can see it die of the signal instead of draining.
	p := harness.Start(t, harness.Options{
		Args:         args,
		LogFilter:    logFilter,
		Require:      require,
		StartTimeout: readyTimeout,
		StopTimeout:  stopTimeout,
	})
	return &tailnetd{Process: p, opts: opts, info: p.Announcement()}
}

// port returns the numeric port of a host:port address.
func port(t testing.TB, addr string) int {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("bad address %q: %v", addr, err)
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatalf("bad port in %q: %v", addr, err)
	}
	return n
}
