package tailscale

// Mixed regions: tailnetd and Tailscale's own derper (built from the Go
// module proxy at the tailscale.com version go.mod pins) meshed both ways
// over TLS with one pre-shared key, real derphttp clients on each relay, and
// Tailscale's derpprobe judging the region's mesh probes.

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"tailscale.com/derp"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"tailnetd.test/interop/harness"
)

var goTools struct {
	once sync.Once
	dir  string
	err  error
}

// goTool returns the path of Tailscale's cmd/<name> (derper or derpprobe),
// built once per test binary with `go install tailscale.com/cmd/...@V`, V
// being the tailscale.com version this module requires.
func goTool(t testing.TB, name string) string {
	t.Helper()
	goTools.once.Do(func() {
		out, err := exec.Command("go", "list", "-m", "-f", "{{.Version}}", "tailscale.com").Output()
		if err != nil {
			goTools.err = fmt.Errorf("go list -m tailscale.com: %w", err)
			return
		}
		version := strings.TrimSpace(string(out))
		dir := filepath.Join(os.TempDir(), "tailnetd-interop-gotools", version)
		cmd := exec.Command("go", "install",
			"tailscale.com/cmd/derper@"+version,
			"tailscale.com/cmd/derpprobe@"+version)
		cmd.Env = append(os.Environ(), "GOBIN="+dir, "GOFLAGS=-mod=mod")
		if out, err := cmd.CombinedOutput(); err != nil {
			goTools.err = fmt.Errorf("go install derper, derpprobe@%s: %w\n%s", version, err, out)
			return
		}
		goTools.dir = dir
	})
	if goTools.err != nil {
		t.Fatalf("building Tailscale's tools: %v", goTools.err)
	}
	return filepath.Join(goTools.dir, name)
}

// derperProc is one running derper.
type derperProc struct {
	t    *testing.T
	args []string
	env  []string
	addr string
	logs *harness.Ring
	cmd  *exec.Cmd
	done chan struct{}
}

func startDerper(t *testing.T, addr string, args, env []string) *derperProc {
	t.Helper()
	d := &derperProc{t: t, args: args, env: env, addr: addr, logs: harness.NewRing(400)}
	t.Cleanup(func() {
		d.kill()
		if t.Failed() {
			t.Logf("derper log:\n%s", d.logs.String())
		}
	})
	d.start()
	return d
}

func (d *derperProc) start() {
	t := d.t
	t.Helper()
	cmd := exec.Command(goTool(t, "derper"), d.args...)
	cmd.Env = append(os.Environ(), d.env...)
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting derper: %v", err)
	}
	pw.Close()
	d.cmd, d.done = cmd, make(chan struct{})
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			d.logs.Add(sc.Text())
		}
	}()
	go func(done chan struct{}) { _ = cmd.Wait(); close(done) }(d.done)
	// Ready once its TLS listener answers (with SNI: derper's manual cert
	// mode serves only its hostname).
	ctx := ctxTimeout(t, 20*time.Second)
	harness.WaitFor(ctx, t, "derper's TLS listener on "+d.addr, func() bool {
		c, err := tls.Dial("tcp", d.addr, &tls.Config{ServerName: "localhost", InsecureSkipVerify: true})
		if err != nil {
			return false
		}
		c.Close()
		return true
	})
}

// kill ends derper at once (SIGKILL: no goodbye to its peers or clients).
func (d *derperProc) kill() {
	if d.cmd == nil {
		return
	}
	_ = d.cmd.Process.Signal(syscall.SIGKILL)
	<-d.done
	d.cmd = nil
}

// mixedRegion is a tailnetd and a derper on localhost TLS ports meshed with
// each other; both lists name both relays (a relay skips itself).
type mixedRegion struct {
	cert      *harness.Cert
	tailnetd  *tailnetd
	derper    *derperProc
	tPort     int
	dPort     int
	regionFor func(port int, name string) *tailcfg.DERPRegion
}

func (e *env) startMixedRegion() *mixedRegion {
	t := e.t
	t.Helper()
	cert := harness.SelfSignedCert(t, e.dir)
	psk := make([]byte, 32)
	rand.Read(psk)
	pskFile := filepath.Join(e.dir, "mesh.key")
	if err := os.WriteFile(pskFile, []byte(hex.EncodeToString(psk)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tAddr, dAddr := harness.FreeTCPAddr(t), harness.FreeTCPAddr(t)
	m := &mixedRegion{cert: cert, tPort: port(t, tAddr), dPort: port(t, dAddr)}
	meshWith := fmt.Sprintf("localhost:%d,localhost:%d", m.tPort, m.dPort)

	// derper's manual cert mode reads <certdir>/<hostname>.crt and .key.
	certDir := filepath.Join(e.dir, "derper-certs")
	if err := os.MkdirAll(certDir, 0o700); err != nil {
		t.Fatal(err)
	}
	for src, dst := range map[string]string{cert.CertFile: "localhost.crt", cert.KeyFile: "localhost.key"} {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(certDir, dst), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// tailnetd trusts the test CA through its flag; derper, a Go program, through SSL_CERT_FILE.
	m.tailnetd = e.start(serverOpts{
		tls:       cert,
		httpsAddr: tAddr,
		extraArgs: []string{
			"--mesh-psk-file", pskFile,
			"--mesh-with", meshWith,
			"--mesh-ca-file", cert.CertFile,
		},
	})
	m.derper = startDerper(t, dAddr, []string{
		"-a", dAddr,
		"-http-port", "-1",
		"-stun=false",
		"-certmode", "manual",
		"-certdir", certDir,
		"-hostname", "localhost",
		"-c", filepath.Join(e.dir, "derper.json"),
		"-mesh-psk-file", pskFile,
		"-mesh-with", meshWith,
	}, []string{"SSL_CERT_FILE=" + cert.CertFile})
	m.regionFor = func(p int, name string) *tailcfg.DERPRegion {
		return &tailcfg.DERPRegion{
			RegionID:   900,
			RegionCode: "mixed",
			RegionName: "tailnetd and derper",
			Nodes: []*tailcfg.DERPNode{{
				Name:             name,
				RegionID:         900,
				HostName:         "localhost",
				IPv4:             "127.0.0.1",
				IPv6:             "none",
				DERPPort:         p,
				STUNPort:         -1,
				InsecureForTests: true,
			}},
		}
	}
	return m
}

// client connects a derphttp region client to the relay on port p and waits
// for its ServerInfo.
func (m *mixedRegion) client(e *env, name string, p int) *peer {
	c := e.regionClientFor(name, m.regionFor(p, name), key.NewNode())
	c.waitFor(e.t, 15*time.Second, "ServerInfo", false, func(ev event) bool {
		_, ok := ev.msg.(derp.ServerInfoMessage)
		return ok
	})
	return c
}

// deliverEventually sends from a to b every 250 ms until b receives it (the
// mesh needs a moment to learn b's key), bounded by timeout.
func deliverEventually(t *testing.T, a, b *peer, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for attempt := 0; ; attempt++ {
		msg := []byte(fmt.Sprintf("%s->%s #%d", a.name, b.name, attempt))
		_ = a.c.Send(b.pub, msg) // a reconnecting client fails a send; the next one retries
		wait := time.After(250 * time.Millisecond)
	drain:
		for {
			select {
			case ev := <-b.events:
				if pkt, ok := ev.msg.(derp.ReceivedPacket); ok && pkt.Source == a.pub && strings.HasPrefix(string(pkt.Data), a.name+"->") {
					return
				}
			case <-wait:
				break drain
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no packet %s -> %s across the mesh within %v", a.name, b.name, timeout)
		}
	}
}

// allWays sends a fresh packet between every ordered pair of clients and
// checks each arrives intact.
func allWays(t *testing.T, clients []*peer) {
	t.Helper()
	for _, a := range clients {
		for _, b := range clients {
			if a == b {
				continue
			}
			pkt := payload(1200)
			a.send(t, b.pub, pkt)
			b.waitPacket(t, a.pub, pkt)
		}
	}
}

// waitPeerGone waits for PeerGone(gone) at p.
func waitPeerGone(t *testing.T, p *peer, gone key.NodePublic) {
	t.Helper()
	p.waitFor(t, 15*time.Second, "PeerGone for "+gone.ShortString(), false, func(ev event) bool {
		g, ok := ev.msg.(derp.PeerGoneMessage)
		return ok && g.Peer == gone
	})
}

// TestMeshMixedRegion: tailnetd and derper mesh with each other in both
// directions; clients on each relay reach every other client, PeerGone
// crosses the mesh both ways, and the region recovers after derper is killed
// and restarted, and after tailnetd is restarted.
func TestMeshMixedRegion(t *testing.T) {
	e := newEnv(t)
	m := e.startMixedRegion()
	t1 := m.client(e, "t1", m.tPort)
	t2 := m.client(e, "t2", m.tPort)
	d1 := m.client(e, "d1", m.dPort)
	d2 := m.client(e, "d2", m.dPort)
	// First across in each direction: waits for the mesh links to come up.
	deliverEventually(t, t1, d1, 20*time.Second)
	deliverEventually(t, d1, t1, 20*time.Second)
	allWays(t, []*peer{t1, t2, d1, d2})

	// PeerGone across the mesh: t2 sent to d1 and d2 (through tailnetd's link
	// to derper); when it leaves, they hear it from derper. And the other way.
	t2.close()
	waitPeerGone(t, d1, t2.pub)
	waitPeerGone(t, d2, t2.pub)
	d2.close()
	waitPeerGone(t, t1, d2.pub)

	// derper dies and comes back on the same port with the same key: its
	// client reconnects by itself and the mesh carries packets again.
	m.derper.kill()
	waitPeerGone(t, t1, d1.pub) // tailnetd dropped the routes of the broken link
	m.derper.start()
	deliverEventually(t, t1, d1, 30*time.Second)
	deliverEventually(t, d1, t1, 30*time.Second)

	// tailnetd restarts (SIGTERM drain, same key file and port).
	if err := m.tailnetd.Stop(); err != nil {
		t.Errorf("tailnetd after SIGTERM: %v", err)
	}
	m.tailnetd.Restart(t)
	deliverEventually(t, d1, t1, 30*time.Second)
	deliverEventually(t, t1, d1, 30*time.Second)
	t3 := m.client(e, "t3", m.tPort)
	d3 := m.client(e, "d3", m.dPort)
	deliverEventually(t, t3, d3, 20*time.Second)
	allWays(t, []*peer{t1, t3, d1, d3})
}

// TestMeshDerpprobe: Tailscale's derpprobe, given a two-node region of
// tailnetd and derper, reports every mesh probe good in both directions.
func TestMeshDerpprobe(t *testing.T) {
	e := newEnv(t)
	m := e.startMixedRegion()
	region := &tailcfg.DERPRegion{RegionID: 900, RegionCode: "mixed", RegionName: "tailnetd and derper"}
	for _, n := range []struct {
		name string
		port int
	}{{"900t", m.tPort}, {"900d", m.dPort}} {
		region.Nodes = append(region.Nodes, &tailcfg.DERPNode{
			Name: n.name, RegionID: 900, HostName: "localhost", IPv4: "127.0.0.1", IPv6: "none",
			DERPPort: n.port, STUNPort: -1,
		})
	}
	dm := &tailcfg.DERPMap{Regions: map[int]*tailcfg.DERPRegion{900: region}}
	mapJSON, err := json.Marshal(dm)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write(mapJSON)
	}))
	pair, err := tls.LoadX509KeyPair(m.cert.CertFile, m.cert.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{pair}}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	_, mapPort, _ := net.SplitHostPort(srv.Listener.Addr().String())

	// Both links must be up before the one-shot probe: a packet each way.
	a := m.client(e, "a", m.tPort)
	b := m.client(e, "b", m.dPort)
	deliverEventually(t, a, b, 20*time.Second)
	deliverEventually(t, b, a, 20*time.Second)

	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, goTool(t, "derpprobe"),
		"--derp-map", "https://localhost:"+mapPort+"/derpmap.json",
		"--once",
		"--spread=false",
		"--stun-interval", "0",
		"--mesh-interval", "1s",
		// The TLS probe wants certificates valid for weeks; the test one lasts a day.
		"--tls-interval", "0",
	)
	cmd.Env = append(os.Environ(), "SSL_CERT_FILE="+m.cert.CertFile)
	out, runErr := cmd.CombinedOutput()
	text := string(out)
	good := map[string]bool{}
	var bad []string
	for _, line := range strings.Split(text, "\n") {
		if i := strings.Index(line, "good: "); i >= 0 {
			// "good: <probe name>: <latency>"
			if f := strings.Fields(line[i+len("good: "):]); len(f) > 0 {
				good[strings.TrimSuffix(f[0], ":")] = true
			}
		}
		if i := strings.Index(line, "bad: "); i >= 0 {
			bad = append(bad, line[i:])
		}
	}
	if runErr != nil || len(bad) > 0 {
		t.Fatalf("derpprobe: %v; bad probes: %v\n%s", runErr, bad, text)
	}
	for _, want := range []string{
		"derp/mixed/900t/900d/mesh",
		"derp/mixed/900d/900t/mesh",
		"derp/mixed/900t/900t/mesh",
		"derp/mixed/900d/900d/mesh",
	} {
		if !good[want] {
			t.Errorf("derpprobe did not report %s good; output:\n%s", want, text)
		}
	}
}
