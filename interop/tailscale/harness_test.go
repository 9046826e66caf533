package tailscale

// Harness: builds (or takes) the tailnetd binary, starts `tailnetd derp` as a
// child process, parses its one-line JSON readiness report, keeps the last
// lines of its log in a ring buffer and prints them (with the case name) when
// a test fails. It only drives the real Tailscale client libraries; it never
// works around server behaviour.

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

const (
	// logTailLines is how many lines of tailnetd's log a failing test prints.
	logTailLines = 100
	// readyTimeout bounds the wait for tailnetd's JSON readiness line.
	readyTimeout = 20 * time.Second
	// stopTimeout bounds the wait for tailnetd to exit after SIGTERM.
	stopTimeout = 10 * time.Second
)

var (
	binOnce sync.Once
	binPath string
	binErr  error
)

// TestMain resolves (builds) the binary before m.Run so that a slow cold
// cargo build does not count against `go test -timeout`.
func TestMain(m *testing.M) {
	binOnce.Do(func() { binPath, binErr = resolveBinary() })
	os.Exit(m.Run())
}

// tailnetdBin returns the binary under test: $TAILNETD_BIN, or tailnetd
// built once per test process with cargo. A build failure fails every test
// that needs the binary, with cargo's output.
func tailnetdBin(t testing.TB) string {
	t.Helper()
	binOnce.Do(func() { binPath, binErr = resolveBinary() })
	if binErr != nil {
		t.Fatalf("cannot get the tailnetd binary: %v", binErr)
	}
	return binPath
}

// repoRoot finds the tailnetd repository root: two levels above this file's
// directory (interop/tailscale), falling back to the working directory that
// `go test` uses (the package directory).
func repoRoot() (string, error) {
	var candidates []string
	if _, file, _, ok := runtime.Caller(0); ok && filepath.IsAbs(file) {
		candidates = append(candidates, filepath.Join(filepath.Dir(file), "..", ".."))
	}
	if wd, err := os.Getwd(); err == nil {
		candidates = append(candidates, filepath.Join(wd, "..", ".."))
	}
	for _, c := range candidates {
		if _, err := os.Stat(filepath.Join(c, "Cargo.toml")); err == nil {
			return filepath.Clean(c), nil
		}
	}
	return "", fmt.Errorf("no Cargo.toml found in %v", candidates)
}

// resolveBinary returns $TAILNETD_BIN or builds tailnetd once with cargo.
func resolveBinary() (string, error) {
	if bin := os.Getenv("TAILNETD_BIN"); bin != "" {
		abs, err := filepath.Abs(bin)
		if err != nil {
			return "", err
		}
		if _, err := os.Stat(abs); err != nil {
			return "", fmt.Errorf("TAILNETD_BIN: %w", err)
		}
		return abs, nil
	}
	root, err := repoRoot()
	if err != nil {
		return "", err
	}
	cmd := exec.Command("cargo", "build", "--quiet", "-p", "tailnetd")
	cmd.Dir = root
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("cargo build -p tailnetd in %s: %v\n%s", root, err, out)
	}
	targetDir := os.Getenv("CARGO_TARGET_DIR")
	if targetDir == "" {
		targetDir = filepath.Join(root, "target")
	} else if !filepath.IsAbs(targetDir) {
		targetDir = filepath.Join(root, targetDir)
	}
	bin := filepath.Join(targetDir, "debug", "tailnetd")
	if _, err := os.Stat(bin); err != nil {
		return "", fmt.Errorf("built tailnetd not found: %w", err)
	}
	return bin, nil
}

// ringBuffer keeps the last n lines written to it.
type ringBuffer struct {
	mu    sync.Mutex
	n     int
	lines []string
	total int
}

func newRing(n int) *ringBuffer { return &ringBuffer{n: n} }

func (r *ringBuffer) add(line string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.total++
	r.lines = append(r.lines, line)
	if len(r.lines) > r.n {
		r.lines = r.lines[len(r.lines)-r.n:]
	}
}

func (r *ringBuffer) logf(format string, args ...any) {
	r.add(time.Now().Format("15:04:05.000 ") + strings.TrimRight(fmt.Sprintf(format, args...), "\n"))
}

func (r *ringBuffer) String() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var b strings.Builder
	if skipped := r.total - len(r.lines); skipped > 0 {
		fmt.Fprintf(&b, "  ... (%d earlier lines)\n", skipped)
	}
	for _, l := range r.lines {
		b.WriteString("  ")
		b.WriteString(l)
		b.WriteByte('\n')
	}
	return b.String()
}

// serverInfo is tailnetd's readiness line (binary contract).
type serverInfo struct {
	HTTPAddr      string  `json:"http_addr"`
	HTTPSAddr     *string `json:"https_addr"`
	STUNAddr      *string `json:"stun_addr"`
	DERPPublicKey *string `json:"derp_public_key"`
}

// serverOpts configures one tailnetd process.
type serverOpts struct {
	httpAddr  string // default 127.0.0.1:0
	stunAddr  string // default 127.0.0.1:0
	httpsAddr string // set together with tls
	tls       *testCert
	keyFile   string // default <tmp>/derp.key
}

// tailnetd is one running `tailnetd derp` process.
type tailnetd struct {
	t       testing.TB
	opts    serverOpts
	cmd     *exec.Cmd
	info    serverInfo
	raw     string // the readiness line as printed
	log     *ringBuffer
	exited  chan struct{}
	waitErr error

	stopOnce sync.Once
}

// failureReport registers a cleanup that, if the test failed, prints the
// case name, the server log tail and the client-side log tail. Registered
// first so that it runs last.
func failureReport(t testing.TB, srvLogs func() []*tailnetd, clientLog *ringBuffer) {
	t.Helper()
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		var b strings.Builder
		fmt.Fprintf(&b, "FAILED CASE %s\n", t.Name())
		for i, s := range srvLogs() {
			fmt.Fprintf(&b, "--- tailnetd #%d (%s) readiness line: %s\n", i+1, strings.Join(s.cmd.Args[1:], " "), s.raw)
			fmt.Fprintf(&b, "--- tailnetd #%d log (last %d lines):\n%s", i+1, logTailLines, s.log.String())
		}
		if clientLog != nil {
			fmt.Fprintf(&b, "--- Go client log:\n%s", clientLog.String())
		}
		t.Log(b.String())
	})
}

// env is the per-test context: servers started and a client log.
type env struct {
	t         *testing.T
	mu        sync.Mutex
	servers   []*tailnetd
	clientLog *ringBuffer
	dir       string
}

func newEnv(t *testing.T) *env {
	t.Helper()
	e := &env{t: t, clientLog: newRing(300), dir: t.TempDir()}
	failureReport(t, func() []*tailnetd {
		e.mu.Lock()
		defer e.mu.Unlock()
		return append([]*tailnetd(nil), e.servers...)
	}, e.clientLog)
	return e
}

// logf is handed to the Go clients; it never touches testing.T so it is
// safe to call from goroutines that outlive the test.
func (e *env) logf(format string, args ...any) { e.clientLog.logf(format, args...) }

// start launches tailnetd with opts and waits for its readiness line.
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
	args := []string{"derp",
		"--http-addr", opts.httpAddr,
		"--stun-addr", opts.stunAddr,
		"--key-file", opts.keyFile,
	}
	if opts.tls != nil {
		if opts.httpsAddr == "" {
			opts.httpsAddr = "127.0.0.1:0"
		}
		args = append(args,
			"--https-addr", opts.httpsAddr,
			"--tls-cert", opts.tls.certFile,
			"--tls-key", opts.tls.keyFile)
	}
	s := &tailnetd{
		t:      t,
		opts:   opts,
		log:    newRing(logTailLines),
		exited: make(chan struct{}),
	}
	s.cmd = exec.Command(tailnetdBin(t), args...)
	s.cmd.Env = append(os.Environ(), "NO_COLOR=1")
	if os.Getenv("TAILNETD_LOG") == "" {
		// Debug level so that a failing case shows what the server did.
		s.cmd.Env = append(s.cmd.Env, "TAILNETD_LOG=debug,hyper=info,rustls=info,tungstenite=info,tokio_tungstenite=info,h2=info")
	}
	stdout, err := s.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr, err := s.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", s.cmd.Path, err)
	}
	e.mu.Lock()
	e.servers = append(e.servers, s)
	e.mu.Unlock()
	t.Cleanup(func() { s.stop() })

	var pipes sync.WaitGroup
	pipes.Add(2)
	go func() {
		defer pipes.Done()
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			s.log.add(sc.Text())
		}
	}()
	ready := make(chan string, 1)
	go func() {
		defer pipes.Done()
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		first := true
		for sc.Scan() {
			if first {
				first = false
				ready <- sc.Text()
				continue
			}
			s.log.add("[stdout] " + sc.Text())
		}
		close(ready)
	}()
	go func() {
		pipes.Wait()
		s.waitErr = s.cmd.Wait()
		close(s.exited)
	}()

	select {
	case line, ok := <-ready:
		if !ok {
			<-s.exited
			t.Fatalf("tailnetd exited (%v) before printing its readiness line", s.waitErr)
		}
		s.raw = line
		dec := json.NewDecoder(strings.NewReader(line))
		if err := dec.Decode(&s.info); err != nil {
			t.Fatalf("readiness line is not a JSON object: %v: %q", err, line)
		}
	case <-time.After(readyTimeout):
		t.Fatalf("no readiness line on stdout within %v", readyTimeout)
	}
	if _, err := net.ResolveTCPAddr("tcp", s.info.HTTPAddr); err != nil || strings.HasSuffix(s.info.HTTPAddr, ":0") {
		t.Fatalf("readiness line: bad http_addr %q (%v)", s.info.HTTPAddr, err)
	}
	if s.info.DERPPublicKey == nil || !strings.HasPrefix(*s.info.DERPPublicKey, "nodekey:") {
		t.Fatalf("readiness line: derp_public_key must be \"nodekey:<hex>\", got line %q", s.raw)
	}
	if opts.tls != nil && (s.info.HTTPSAddr == nil || strings.HasSuffix(*s.info.HTTPSAddr, ":0")) {
		t.Fatalf("readiness line: https_addr missing although --https-addr was given: %q", s.raw)
	}
	if s.info.STUNAddr == nil || strings.HasSuffix(*s.info.STUNAddr, ":0") {
		t.Fatalf("readiness line: stun_addr missing although --stun-addr was given: %q", s.raw)
	}
	return s
}

func (s *tailnetd) httpsAddr() string {
	if s.info.HTTPSAddr == nil {
		return ""
	}
	return *s.info.HTTPSAddr
}

func (s *tailnetd) stunAddr() string {
	if s.info.STUNAddr == nil {
		return ""
	}
	return *s.info.STUNAddr
}

func (s *tailnetd) publicKey() string {
	if s.info.DERPPublicKey == nil {
		return ""
	}
	return *s.info.DERPPublicKey
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

// stop sends SIGTERM, waits for exit (killing after stopTimeout) and returns
// the exit error (nil for exit status 0).
func (s *tailnetd) stop() error {
	s.stopOnce.Do(func() {
		if s.cmd.Process == nil {
			return
		}
		select {
		case <-s.exited:
			return
		default:
		}
		_ = s.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-s.exited:
		case <-time.After(stopTimeout):
			s.log.add(fmt.Sprintf("[harness] tailnetd did not exit within %v of SIGTERM; killing", stopTimeout))
			_ = s.cmd.Process.Kill()
			<-s.exited
			s.waitErr = errors.New("did not exit after SIGTERM within " + stopTimeout.String())
		}
	})
	<-s.exited
	return s.waitErr
}

// testCert is a self-signed ECDSA certificate for "localhost" and 127.0.0.1.
type testCert struct {
	certFile, keyFile string
	leaf              *x509.Certificate
	pool              *x509.CertPool
}

func newTestCert(t testing.TB, dir string) *testCert {
	t.Helper()
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "localhost"},
		DNSNames:              []string{"localhost"},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &priv.PublicKey, priv)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	c := &testCert{
		certFile: filepath.Join(dir, "cert.pem"),
		keyFile:  filepath.Join(dir, "key.pem"),
		leaf:     leaf,
		pool:     x509.NewCertPool(),
	}
	c.pool.AddCert(leaf)
	if err := os.WriteFile(c.certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(c.keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	return c
}

// tlsDial opens our own TLS 1.3 connection to addr trusting only c.
func (c *testCert) tlsDial(ctx context.Context, addr string) (*tls.Conn, error) {
	d := tls.Dialer{Config: &tls.Config{
		ServerName: "localhost",
		RootCAs:    c.pool,
		MinVersion: tls.VersionTLS12,
	}}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	return conn.(*tls.Conn), nil
}
