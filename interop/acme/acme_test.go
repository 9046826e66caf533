package acme

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"tailnetd.test/interop/harness"
)

func TestMain(m *testing.M) { harness.Main(m) }

// The hostname certificates are issued for: Pebble's validation authority resolves it to the
// loopback address where tailnetd listens on the ports Pebble's config names.
const hostname = "localhost"

var pebbleBuild struct {
	once     sync.Once
	bin, dir string
	err      error
}

// pebbleBinary builds Pebble (the version go.mod pins) once per test binary and returns the
// binary and the module's directory (its test certificates live there).
func pebbleBinary(t *testing.T) (bin, moduleDir string) {
	t.Helper()
	pebbleBuild.once.Do(func() {
		out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/letsencrypt/pebble/v2").Output()
		if err != nil {
			pebbleBuild.err = fmt.Errorf("go list -m pebble: %w", err)
			return
		}
		pebbleBuild.dir = strings.TrimSpace(string(out))
		bin := filepath.Join(os.TempDir(), "tailnetd-interop-acme-pebble")
		if out, err := exec.Command("go", "build", "-o", bin, "github.com/letsencrypt/pebble/v2/cmd/pebble").CombinedOutput(); err != nil {
			pebbleBuild.err = fmt.Errorf("go build pebble: %w\n%s", err, out)
			return
		}
		pebbleBuild.bin = bin
	})
	if pebbleBuild.err != nil {
		t.Fatalf("building Pebble: %v", pebbleBuild.err)
	}
	return pebbleBuild.bin, pebbleBuild.dir
}

// pebble is one running Pebble ACME server.
type pebble struct {
	directory string // ACME directory URL
	mgmt      string // management API base URL
	caFile    string // the CA of Pebble's own HTTPS (its test minica)
	logs      *harness.Ring
}

// startPebble runs Pebble whose validation authority connects to httpPort (HTTP-01) and
// tlsPort (TLS-ALPN-01) of `localhost`, really validating (only its random pre-validation sleep
// is off). Profile "default" issues 90-day certificates, "shortlived" ones of shortSeconds.
func startPebble(t *testing.T, httpPort, tlsPort, shortSeconds int) *pebble {
	t.Helper()
	bin, mod := pebbleBinary(t)
	listen := harness.FreeTCPAddr(t)
	mgmt := harness.FreeTCPAddr(t)
	cfg := map[string]any{
		"pebble": map[string]any{
			"listenAddress":                  listen,
			"managementListenAddress":        mgmt,
			"certificate":                    filepath.Join(mod, "test/certs/localhost/cert.pem"),
			"privateKey":                     filepath.Join(mod, "test/certs/localhost/key.pem"),
			"httpPort":                       httpPort,
			"tlsPort":                        tlsPort,
			"ocspResponderURL":               "",
			"externalAccountBindingRequired": false,
			"retryAfter":                     map[string]int{"authz": 1, "order": 1},
			"keyAlgorithm":                   "ecdsa",
			"profiles": map[string]any{
				"default":    map[string]any{"description": "90 days", "validityPeriod": 7776000},
				"shortlived": map[string]any{"description": "seconds", "validityPeriod": shortSeconds},
			},
		},
	}
	raw, _ := json.Marshal(cfg)
	path := filepath.Join(t.TempDir(), "pebble.json")
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, bin, "-config", path)
	cmd.Env = append(os.Environ(), "PEBBLE_VA_NOSLEEP=1")
	p := &pebble{logs: harness.NewRing(400), caFile: filepath.Join(mod, "test/certs/pebble.minica.pem")}
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	go func() {
		buf := make([]byte, 4096)
		var line bytes.Buffer
		for {
			n, err := pr.Read(buf)
			for _, b := range buf[:n] {
				if b == '\n' {
					p.logs.Add(line.String())
					line.Reset()
				} else {
					line.WriteByte(b)
				}
			}
			if err != nil {
				return
			}
		}
	}()
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting Pebble: %v", err)
	}
	t.Cleanup(func() {
		cancel()
		_ = cmd.Wait()
		_ = pw.Close()
		if t.Failed() {
			t.Logf("pebble log:\n%s", p.logs.String())
		}
	})
	_, port, _ := net.SplitHostPort(listen)
	_, mport, _ := net.SplitHostPort(mgmt)
	p.directory = "https://localhost:" + port + "/dir"
	p.mgmt = "https://localhost:" + mport
	wctx, wcancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer wcancel()
	harness.WaitFor(wctx, t, "Pebble listening", func() bool {
		c, err := net.Dial("tcp", mgmt)
		if err == nil {
			c.Close()
			c2, err := net.Dial("tcp", listen)
			if err == nil {
				c2.Close()
				return true
			}
		}
		return false
	})
	return p
}

// root is the root certificate Pebble issues under, from its management API (/roots/0).
func (p *pebble) root(t *testing.T) *x509.CertPool {
	t.Helper()
	caPEM, err := os.ReadFile(p.caFile)
	if err != nil {
		t.Fatal(err)
	}
	minica := x509.NewCertPool()
	minica.AppendCertsFromPEM(caPEM)
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: minica}}, Timeout: 10 * time.Second}
	resp, err := client.Get(p.mgmt + "/roots/0")
	if err != nil {
		t.Fatalf("fetching Pebble's root: %v", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	pool := x509.NewCertPool()
	if resp.StatusCode != 200 || !pool.AppendCertsFromPEM(body) {
		t.Fatalf("Pebble's /roots/0: %d %q", resp.StatusCode, body)
	}
	return pool
}

// relay is tailnetd's derp role with ACME flags; extra flags are appended.
func relay(t *testing.T, p *pebble, certDir, httpsAddr, httpAddr string, extra ...string) *harness.Process {
	t.Helper()
	args := []string{
		"derp",
		"--https-addr", httpsAddr,
		"--http-addr", httpAddr,
		"--stun-addr", "",
		"--metrics-addr", "127.0.0.1:0",
		"--key-file", filepath.Join(certDir, "..", "derp.key"),
		"--acme-hostname", hostname,
		"--acme-cert-dir", certDir,
		"--acme-directory-url", p.directory,
		"--acme-ca-file", p.caFile,
		"--acme-check-interval", "1s",
	}
	return harness.Start(t, harness.Options{
		Args:      append(args, extra...),
		Require:   []string{"https_addr", "metrics_addr"},
		LogFilter: "info,derp::edge::acme=debug",
	})
}

// servedLeaf makes a TLS handshake as a browser would (SNI localhost, ALPN http/1.1) and
// returns the leaf certificate the relay served; with roots, the chain must verify to them.
func servedLeaf(addr string, roots *x509.CertPool) (*x509.Certificate, error) {
	cfg := &tls.Config{ServerName: hostname, NextProtos: []string{"http/1.1"}, RootCAs: roots, InsecureSkipVerify: roots == nil}
	d := &net.Dialer{Timeout: 5 * time.Second}
	c, err := tls.DialWithDialer(d, "tcp", addr, cfg)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	return c.ConnectionState().PeerCertificates[0], nil
}

// waitServed waits until the relay serves a certificate chaining to roots (and, with notSerial,
// one whose serial differs from it).
func waitServed(t *testing.T, addr string, roots *x509.CertPool, notSerial string, within time.Duration) *x509.Certificate {
	t.Helper()
	var leaf *x509.Certificate
	var last error
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		l, err := servedLeaf(addr, roots)
		if err == nil && l.SerialNumber.String() != notSerial {
			leaf = l
			break
		}
		last = err
		time.Sleep(250 * time.Millisecond)
	}
	if leaf == nil {
		t.Fatalf("no ACME certificate served on %s within %v (last: %v)", addr, within, last)
	}
	return leaf
}

// metric reads one sample (name with labels, as exposed) from the relay's metrics listener.
func metric(t *testing.T, p *harness.Process, sample string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + p.Announcement().MetricsAddr + "/metrics")
	if err != nil {
		t.Fatalf("metrics: %v", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(body), "\n") {
		if rest, ok := strings.CutPrefix(line, sample+" "); ok {
			v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
			if err != nil {
				t.Fatalf("metric %s: %v", sample, err)
			}
			return v
		}
	}
	return 0
}

// storedLeaf is the leaf of the certificate file in the cert dir (derper's layout: the key,
// then the chain), checking the key is there too.
func storedLeaf(t *testing.T, certDir string) *x509.Certificate {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(certDir, hostname))
	if err != nil {
		t.Fatalf("stored certificate: %v", err)
	}
	block, rest := pem.Decode(raw)
	if block == nil || !strings.Contains(block.Type, "PRIVATE KEY") {
		t.Fatalf("stored file does not start with the private key: %q", raw)
	}
	block, _ = pem.Decode(rest)
	if block == nil || block.Type != "CERTIFICATE" {
		t.Fatalf("no certificate after the key in the stored file")
	}
	leaf, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return leaf
}

func port(t *testing.T, addr string) int {
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	n, _ := strconv.Atoi(p)
	return n
}

const issued = `derp_acme_renewals_total{result="issued"}`
const failed = `derp_acme_renewals_total{result="failed"}`

// TLS-ALPN-01: Pebble connects to the HTTPS listener with ALPN acme-tls/1. The certificate is
// stored, served chaining to Pebble's root, and after a restart served from the directory
// without a new order.
func TestACMEIssuesWithTLSALPN01AndReusesItAfterRestart(t *testing.T) {
	httpsAddr := harness.FreeTCPAddr(t)
	p := startPebble(t, 1 /* no HTTP-01 here */, port(t, httpsAddr), 3600)
	roots := p.root(t)
	certDir := filepath.Join(t.TempDir(), "certs")
	r := relay(t, p, certDir, httpsAddr, "127.0.0.1:0")
	leaf := waitServed(t, httpsAddr, roots, "", 60*time.Second)
	if err := leaf.VerifyHostname(hostname); err != nil {
		t.Fatal(err)
	}
	if got := storedLeaf(t, certDir); !got.Equal(leaf) {
		t.Fatalf("served serial %s, stored %s", leaf.SerialNumber, got.SerialNumber)
	}
	if got := metric(t, r, issued); got != 1 {
		t.Fatalf("%s = %v, want 1", issued, got)
	}
	if !strings.Contains(r.Log().String(), "tls-alpn-01") {
		t.Fatalf("no log line naming the challenge")
	}
	// Pebble's validation authority really connected with ALPN acme-tls/1.
	if got := metric(t, r, `derp_acme_challenges_answered_total{type="tls-alpn-01"}`); got < 1 {
		t.Fatalf("TLS-ALPN-01 challenge answered %v times", got)
	}

	r.Restart(t)
	again := waitServed(t, httpsAddr, roots, "", 10*time.Second)
	if !again.Equal(leaf) {
		t.Fatalf("after restart serial %s, want the stored %s", again.SerialNumber, leaf.SerialNumber)
	}
	// Several renewal checks (every 1 s) later, still no order.
	time.Sleep(3 * time.Second)
	if got := metric(t, r, issued) + metric(t, r, failed); got != 0 {
		t.Fatalf("orders after a restart with a stored certificate: %v, want 0", got)
	}
	if !strings.Contains(r.Log().String(), "ACME certificate loaded from cert_dir") {
		t.Fatalf("no log line about the stored certificate")
	}
}

// HTTP-01: Pebble fetches /.well-known/acme-challenge/TOKEN from the plain HTTP listener.
func TestACMEIssuesWithHTTP01(t *testing.T) {
	httpAddr := harness.FreeTCPAddr(t)
	p := startPebble(t, port(t, httpAddr), 1 /* no TLS-ALPN-01 here */, 3600)
	roots := p.root(t)
	certDir := filepath.Join(t.TempDir(), "certs")
	// A stored file that is not a certificate: logged, counted, and replaced by a new order.
	if err := os.MkdirAll(certDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(certDir, hostname), []byte("half-written"), 0o600); err != nil {
		t.Fatal(err)
	}
	r := relay(t, p, certDir, "127.0.0.1:0", httpAddr, "--acme-challenge", "http-01")
	if got := metric(t, r, "derp_acme_store_errors_total"); got != 1 {
		t.Fatalf("derp_acme_store_errors_total = %v, want 1", got)
	}
	if !strings.Contains(r.Log().String(), "stored ACME certificate unusable") {
		t.Fatalf("no log line for the unusable stored file")
	}
	httpsAddr := r.Announcement().HTTPSAddr
	leaf := waitServed(t, httpsAddr, roots, "", 60*time.Second)
	if got := storedLeaf(t, certDir); !got.Equal(leaf) {
		t.Fatalf("served serial %s, stored %s", leaf.SerialNumber, got.SerialNumber)
	}
	if got := metric(t, r, `derp_acme_challenges_answered_total{type="http-01"}`); got < 1 {
		t.Fatalf("HTTP-01 challenge answered %v times", got)
	}
	// An unknown token is a 404, not the relay's page.
	resp, err := http.Get("http://" + httpAddr + "/.well-known/acme-challenge/nonsense")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("unknown token: %d", resp.StatusCode)
	}
}

// Renewal: with a 12-second certificate (profile "shortlived"), a new one is ordered when a
// third of its life is left, served, and stored; then, with the CA gone, the relay keeps
// serving the old certificate, logs the failure and counts it.
func TestACMERenewsBeforeExpiryAndSurvivesCAOutage(t *testing.T) {
	httpsAddr := harness.FreeTCPAddr(t)
	p := startPebble(t, 1, port(t, httpsAddr), 12)
	roots := p.root(t)
	certDir := filepath.Join(t.TempDir(), "certs")
	r := relay(t, p, certDir, httpsAddr, "127.0.0.1:0", "--acme-profile", "shortlived")
	first := waitServed(t, httpsAddr, roots, "", 60*time.Second)
	life := first.NotAfter.Sub(first.NotBefore)
	if life > 15*time.Second {
		t.Fatalf("profile shortlived gave a %v certificate", life)
	}
	second := waitServed(t, httpsAddr, roots, first.SerialNumber.String(), 30*time.Second)
	// Renewed before expiry, after two thirds of the lifetime.
	if renewedAt := second.NotBefore; renewedAt.Before(first.NotBefore.Add(life*2/3-time.Second)) || !renewedAt.Before(first.NotAfter) {
		t.Fatalf("renewed at %v for a certificate valid %v..%v", renewedAt, first.NotBefore, first.NotAfter)
	}
	if got := storedLeaf(t, certDir); got.SerialNumber.Cmp(first.SerialNumber) == 0 {
		t.Fatalf("the stored certificate is still the first one")
	}
	if err := r.Stop(); err != nil {
		t.Fatal(err)
	}

	// The CA unreachable (nothing listens there): the stored certificate is due within seconds.
	dead := harness.FreeTCPAddr(t)
	_, deadPort, _ := net.SplitHostPort(dead)
	stored := storedLeaf(t, certDir)
	bad := &pebble{directory: "https://localhost:" + deadPort + "/dir", caFile: p.caFile}
	r2 := relay(t, bad, certDir, httpsAddr, "127.0.0.1:0", "--acme-profile", "shortlived")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	harness.WaitFor(ctx, t, "a failed order counted", func() bool { return metric(t, r2, failed) >= 1 })
	if !strings.Contains(r2.Log().String(), "ACME order failed; keeping the certificate in service") {
		t.Fatalf("no log line for the failed order")
	}
	// Still serving the stored certificate (checked without verification: it may have expired).
	leaf, err := servedLeaf(httpsAddr, nil)
	if err != nil {
		t.Fatalf("relay stopped serving TLS after a failed order: %v", err)
	}
	if !leaf.Equal(stored) {
		t.Fatalf("served serial %s, want the stored %s", leaf.SerialNumber, stored.SerialNumber)
	}
	// And the relay itself still answers.
	resp, err := http.Get("http://" + r2.Announcement().HTTPAddr + "/derp/probe")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("/derp/probe: %d", resp.StatusCode)
	}
}
