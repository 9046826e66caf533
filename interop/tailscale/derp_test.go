package tailscale

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"go4.org/mem"
	"tailnetd.test/interop/harness"
	"tailscale.com/derp"
	"tailscale.com/types/key"
)

// derpMagic is derp.Magic: "DERP" + U+1F511.
const derpMagic = "DERP\xf0\x9f\x94\x91"

// TestTransportUpgradeHTTP: two derphttp clients over plain HTTP
// (`Upgrade: DERP`, 101 path) exchange 1, 1400 and 65536-byte packets.
func TestTransportUpgradeHTTP(t *testing.T) {
	e := newEnv(t)
	s := e.start(serverOpts{})
	a := e.plainClient("alice", s, key.NewNode())
	b := e.plainClient("bob", s, key.NewNode())
	a.connect(t, s)
	b.connect(t, s)
	exchange(t, a, b)
}

// TestUpgrade101Response checks the exact non-fast-start HTTP response that
// derper sends (the Go client only needs the 101, the headers are for
// parity) and that the ServerKey frame follows on the same stream.
func TestUpgrade101Response(t *testing.T) {
	e := newEnv(t)
	s := e.start(serverOpts{})
	conn, err := net.DialTimeout("tcp", s.info.HTTPAddr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	req := "GET /derp HTTP/1.1\r\nHost: localhost\r\nUser-Agent: Go-http-client/1.1\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"
	if _, err := io.WriteString(conn, req); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("reading HTTP response to Upgrade: DERP: %v", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("status %q, want 101 Switching Protocols", resp.Status)
	}
	want := map[string]string{
		"Upgrade":         "DERP",
		"Connection":      "Upgrade",
		"Derp-Version":    "2",
		"Derp-Public-Key": metaKeyHex(s.info.DERPPublicKey),
	}
	for h, v := range want {
		if got := resp.Header.Get(h); got != v {
			t.Errorf("101 response header %s = %q, want %q (derper parity; the Go client ignores it)", h, got, v)
		}
	}
	checkServerKeyFrame(t, br, s)
}

// checkServerKeyFrame reads the first DERP frame and checks that it is a
// ServerKey frame (0x01, len >= 40, magic, key of s).
func checkServerKeyFrame(t *testing.T, r io.Reader, s *tailnetd) {
	t.Helper()
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		t.Fatalf("reading first DERP frame header: %v", err)
	}
	if hdr[0] == 'H' {
		rest, _ := bufio.NewReader(r).ReadString('\n')
		t.Fatalf("got an HTTP response (%q) where the ServerKey frame was expected", string(hdr[:])+rest)
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	if hdr[0] != 0x01 || n < 40 || n > 1<<10 {
		t.Fatalf("first frame: type %#x len %d, want ServerKey (0x01) with 40 <= len <= 1024", hdr[0], n)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		t.Fatalf("reading ServerKey payload: %v", err)
	}
	if string(body[:8]) != derpMagic {
		t.Fatalf("ServerKey magic = % x, want % x", body[:8], []byte(derpMagic))
	}
	k := key.NodePublicFromRaw32(mem.B(body[8:40]))
	if k.String() != s.info.DERPPublicKey {
		t.Fatalf("ServerKey frame key %s != readiness line %s", k, s.info.DERPPublicKey)
	}
}

// TestTransportTLS: two region clients (TLS, self-signed certificate,
// InsecureForTests) exchange packets; the client must have taken the
// fast-start path (TLS 1.3 + meta cert).
func TestTransportTLS(t *testing.T) {
	e := newEnv(t)
	cert := harness.SelfSignedCert(t, e.dir)
	s := e.start(serverOpts{tls: cert})
	a := e.regionClient("alice", s, key.NewNode())
	b := e.regionClient("bob", s, key.NewNode())
	a.connect(t, s)
	b.connect(t, s)
	exchange(t, a, b)

	// What derphttp.Client.connect saw: it only sends Derp-Fast-Start when the
	// TLS version is 1.3 and parseMetaCert finds "derpkey<hex>" with a serial
	// that fits a byte.
	for _, p := range []*peer{a, b} {
		cs, ok := p.c.TLSConnectionState()
		if !ok {
			t.Fatalf("%s: no TLS connection state", p.name)
		}
		if cs.Version != tls.VersionTLS13 {
			t.Errorf("%s: TLS version %#x, want TLS 1.3 (fast start needs it)", p.name, cs.Version)
		}
		if cs.NegotiatedProtocol == "h2" {
			t.Errorf("%s: ALPN negotiated h2; DERP needs HTTP/1.1", p.name)
		}
		checkMetaCert(t, p.name+" (derphttp)", cs, s)
	}
}

// TestTransportTLSPinned: a DERP node pinned with CertName
// "sha256-raw:<hex>" (how self-signed/IP-only derpers are deployed): the
// client skips CA verification but requires exactly one non-meta
// certificate with that hash, valid for the host. So the served chain must
// be exactly [leaf, meta cert].
func TestTransportTLSPinned(t *testing.T) {
	e := newEnv(t)
	cert := harness.SelfSignedCert(t, e.dir)
	s := e.start(serverOpts{tls: cert})
	reg := testRegion(t, s)
	reg.Nodes[0].InsecureForTests = false
	reg.Nodes[0].CertName = fmt.Sprintf("sha256-raw:%x", sha256.Sum256(cert.Leaf.Raw))
	a := e.regionClientFor("alice", reg, key.NewNode())
	b := e.regionClientFor("bob", reg, key.NewNode())
	a.connect(t, s)
	b.connect(t, s)
	exchange(t, a, b, 1400)
}

// checkMetaCert checks that the last certificate is derper's meta cert.
func checkMetaCert(t *testing.T, who string, cs *tls.ConnectionState, s *tailnetd) {
	t.Helper()
	certs := cs.PeerCertificates
	if len(certs) < 2 {
		t.Fatalf("%s: server sent %d certificate(s); want leaf + meta cert", who, len(certs))
	}
	meta := certs[len(certs)-1]
	wantCN := "derpkey" + metaKeyHex(s.info.DERPPublicKey)
	if meta.Subject.CommonName != wantCN {
		t.Errorf("%s: last certificate CN %q, want %q", who, meta.Subject.CommonName, wantCN)
	}
	if meta.SerialNumber == nil || meta.SerialNumber.Int64() != 2 || !meta.SerialNumber.IsInt64() {
		t.Errorf("%s: meta cert serial %v, want 2 (DERP protocol version)", who, meta.SerialNumber)
	}
}

// TestFastStartRaw: our own TLS dial sees the meta cert; a raw
// `GET /derp` with `Derp-Fast-Start: 1` gets no HTTP response, the first
// bytes are the ServerKey frame; then the same exchange driven by
// derp.NewClient with the key learnt from the meta cert (exactly what
// derphttp does) completes the handshake and relays a packet to itself.
func TestFastStartRaw(t *testing.T) {
	e := newEnv(t)
	cert := harness.SelfSignedCert(t, e.dir)
	s := e.start(serverOpts{tls: cert})

	ctx := ctxTimeout(t, 10*time.Second)
	conn, err := cert.TLSDial(ctx, s.info.HTTPSAddr)
	if err != nil {
		t.Fatalf("TLS dial (verifying the test cert for localhost): %v", err)
	}
	defer conn.Close()
	cs := conn.ConnectionState()
	if cs.Version != tls.VersionTLS13 {
		t.Errorf("TLS version %#x, want TLS 1.3", cs.Version)
	}
	checkMetaCert(t, "own TLS dial", &cs, s)

	conn.SetDeadline(time.Now().Add(10 * time.Second))
	req := "GET /derp HTTP/1.1\r\nHost: localhost\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Fast-Start: 1\r\n\r\n"
	if _, err := io.WriteString(conn, req); err != nil {
		t.Fatal(err)
	}
	checkServerKeyFrame(t, conn, s)
	conn.Close()

	// Full fast-start handshake with the real derp.Client: HTTP request
	// unflushed, ClientInfo sealed to the meta-cert key, one flush.
	conn2, err := cert.TLSDial(ctx, s.info.HTTPSAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn2.Close()
	conn2.SetDeadline(time.Now().Add(10 * time.Second))
	cs2 := conn2.ConnectionState()
	metaCN := cs2.PeerCertificates[len(cs2.PeerCertificates)-1].Subject.CommonName
	serverKey, err := key.ParseNodePublicUntyped(mem.S(strings.TrimPrefix(metaCN, "derpkey")))
	if err != nil {
		t.Fatalf("meta cert CN %q: %v", metaCN, err)
	}
	brw := bufio.NewReadWriter(bufio.NewReader(conn2), bufio.NewWriter(conn2))
	if _, err := io.WriteString(brw, req); err != nil {
		t.Fatal(err)
	}
	priv := key.NewNode()
	dc, err := derp.NewClient(priv, conn2, brw, e.logf, derp.ServerPublicKey(serverKey), derp.CanAckPings(true))
	if err != nil {
		t.Fatalf("derp.NewClient (fast start): %v", err)
	}
	m, err := dc.Recv()
	if err != nil {
		t.Fatalf("fast-start Recv: %v", err)
	}
	if _, ok := m.(derp.ServerInfoMessage); !ok {
		t.Fatalf("fast-start: first message %s, want ServerInfoMessage", describe(m))
	}
	pkt := payload(1400)
	if err := dc.Send(priv.Public(), pkt); err != nil {
		t.Fatalf("fast-start Send to self: %v", err)
	}
	for {
		m, err := dc.Recv()
		if err != nil {
			t.Fatalf("fast-start Recv of own packet: %v", err)
		}
		if _, ok := m.(derp.KeepAliveMessage); ok {
			continue
		}
		rp, ok := m.(derp.ReceivedPacket)
		if !ok || rp.Source != priv.Public() || !bytes.Equal(rp.Data, pkt) {
			t.Fatalf("fast-start: sent 1400 bytes to self, got %s", describe(m))
		}
		break
	}
}

// TestPing: derphttp.Client.Ping gets its Pong.
func TestPing(t *testing.T) {
	e := newEnv(t)
	s := e.start(serverOpts{})
	a := e.plainClient("alice", s, key.NewNode())
	a.connect(t, s)
	for i := range 3 {
		if err := a.c.Ping(ctxTimeout(t, 5*time.Second)); err != nil {
			t.Fatalf("Ping #%d: %v", i+1, err)
		}
	}
}

// TestNotePreferred: NotePreferred(true) (sent by magicsock for the home
// region) must not break the connection.
func TestNotePreferred(t *testing.T) {
	e := newEnv(t)
	s := e.start(serverOpts{})
	a := e.plainClient("alice", s, key.NewNode())
	b := e.plainClient("bob", s, key.NewNode())
	a.connect(t, s)
	b.connect(t, s)
	a.c.NotePreferred(true)
	if err := a.c.Ping(ctxTimeout(t, 5*time.Second)); err != nil {
		t.Fatalf("Ping after NotePreferred(true): %v", err)
	}
	pkt := payload(1400)
	a.send(t, b.pub, pkt)
	b.waitPacket(t, a.pub, pkt)
	pkt = payload(100)
	b.send(t, a.pub, pkt)
	ev := a.waitFor(t, 5*time.Second, "packet from bob", false, func(ev event) bool {
		_, ok := ev.msg.(derp.ReceivedPacket)
		return ok
	})
	if ev.gen != 1 {
		t.Fatalf("alice reconnected after NotePreferred (connection generation %d)", ev.gen)
	}
	a.c.NotePreferred(false)
	if err := a.c.Ping(ctxTimeout(t, 5*time.Second)); err != nil {
		t.Fatalf("Ping after NotePreferred(false): %v", err)
	}

	// A client that is preferred before connecting sends NotePreferred
	// pipelined right behind ClientInfo (before ServerInfo arrives).
	c := e.plainClient("carol", s, key.NewNode())
	c.c.NotePreferred(true)
	c.connect(t, s)
	pkt = payload(1400)
	b.send(t, c.pub, pkt)
	c.waitPacket(t, b.pub, pkt)
}

// TestPeerGoneDisconnected: after alice sent to bob, alice leaving makes the
// server tell bob PeerGone(alice, Disconnected).
func TestPeerGoneDisconnected(t *testing.T) {
	e := newEnv(t)
	s := e.start(serverOpts{})
	a := e.plainClient("alice", s, key.NewNode())
	b := e.plainClient("bob", s, key.NewNode())
	a.connect(t, s)
	b.connect(t, s)
	pkt := payload(64)
	a.send(t, b.pub, pkt)
	b.waitPacket(t, a.pub, pkt)
	a.close()
	ev := b.waitFor(t, 10*time.Second, "PeerGoneMessage for alice", false, func(ev event) bool {
		pg, ok := ev.msg.(derp.PeerGoneMessage)
		return ok && pg.Peer == a.pub
	})
	if r := ev.msg.(derp.PeerGoneMessage).Reason; r != derp.PeerGoneReasonDisconnected {
		t.Fatalf("PeerGone reason %#x, want Disconnected (0x00)", byte(r))
	}
}

// TestPeerGoneNotHere: a disco-looking packet to an unknown key yields
// PeerGone(NotHere) to the sender; a non-disco one does not.
func TestPeerGoneNotHere(t *testing.T) {
	e := newEnv(t)
	s := e.start(serverOpts{})
	a := e.plainClient("alice", s, key.NewNode())
	a.connect(t, s)
	unknownWG := key.NewNode().Public()
	unknownDisco := key.NewNode().Public()
	a.send(t, unknownWG, payload(100))
	a.send(t, unknownDisco, discoPacket())
	ev := a.waitFor(t, 10*time.Second, "PeerGoneMessage", false, func(ev event) bool {
		_, ok := ev.msg.(derp.PeerGoneMessage)
		return ok
	})
	pg := ev.msg.(derp.PeerGoneMessage)
	if pg.Peer == unknownWG {
		t.Fatalf("got PeerGone for the destination of a non-disco packet; derper stays silent for those")
	}
	if pg.Peer != unknownDisco {
		t.Fatalf("PeerGone for %s, want %s", pg.Peer.ShortString(), unknownDisco.ShortString())
	}
	if pg.Reason != derp.PeerGoneReasonNotHere {
		t.Fatalf("PeerGone reason %#x, want NotHere (0x01)", byte(pg.Reason))
	}
	// The connection survives.
	if err := a.c.Ping(ctxTimeout(t, 5*time.Second)); err != nil {
		t.Fatalf("Ping after PeerGone(NotHere): %v", err)
	}
}

// TestFirstMessageServerInfo: the first message each client receives after
// connecting is derp.ServerInfoMessage (magicsock marks the region healthy
// on it; derp's own tests assert it in waitConnect).
func TestFirstMessageServerInfo(t *testing.T) {
	e := newEnv(t)
	s := e.start(serverOpts{})
	for i := range 3 {
		p := e.plainClient(fmt.Sprintf("client%d", i), s, key.NewNode())
		p.connect(t, s) // asserts ServerInfo first
	}
}

// TestDuplicateKeys: as `tailscale debug derp` does, open several
// connections with one key and leave them open. All must stay connected and
// see one server key; packets go to the newest; a connection that sends
// becomes the destination (derper's last-writer-wins); closing the active
// one does not produce PeerGone because the key is still connected.
func TestDuplicateKeys(t *testing.T) {
	e := newEnv(t)
	s := e.start(serverOpts{})
	sender := e.plainClient("sender", s, key.NewNode())
	sender.connect(t, s)

	dupPriv := key.NewNode()
	var dups []*peer
	for i := range 3 {
		p := e.plainClient(fmt.Sprintf("dup%d", i+1), s, dupPriv)
		p.connect(t, s)
		dups = append(dups, p)
	}
	for _, p := range dups {
		if p.c.ServerPublicKey() != dups[0].c.ServerPublicKey() {
			t.Fatalf("%s saw server key %s, %s saw %s", p.name, p.c.ServerPublicKey(), dups[0].name, dups[0].c.ServerPublicKey())
		}
		if err := p.c.Ping(ctxTimeout(t, 5*time.Second)); err != nil {
			t.Fatalf("%s (duplicate connection) Ping: %v", p.name, err)
		}
	}

	// Packets go to the newest connection.
	pkt := payload(1400)
	sender.send(t, dupPriv.Public(), pkt)
	dups[2].waitPacket(t, sender.pub, pkt)
	dups[0].expectNoPacket(t, 200*time.Millisecond)
	dups[1].expectNoPacket(t, 0)

	// Last writer wins: dup1 writes, then is the destination.
	hello := payload(100)
	dups[0].send(t, sender.pub, hello)
	sender.waitPacket(t, dupPriv.Public(), hello)
	pkt = payload(1400)
	sender.send(t, dupPriv.Public(), pkt)
	dups[0].waitPacket(t, sender.pub, pkt)
	dups[1].expectNoPacket(t, 200*time.Millisecond)
	dups[2].expectNoPacket(t, 0)

	// Closing one duplicate: no PeerGone (the key is still here), and
	// packets still reach one of the remaining connections.
	dups[0].close()
	time.Sleep(200 * time.Millisecond)
	pkt = payload(1400)
	sender.send(t, dupPriv.Public(), pkt)
	got := make(chan string, 2)
	for _, p := range dups[1:] {
		go func(p *peer) {
			for {
				select {
				case ev := <-p.events:
					if rp, ok := ev.msg.(derp.ReceivedPacket); ok && bytes.Equal(rp.Data, pkt) {
						got <- p.name
						return
					}
				case <-time.After(3 * time.Second):
					return
				}
			}
		}(p)
	}
	select {
	case <-got:
	case <-time.After(4 * time.Second):
		t.Fatalf("after closing dup1, a packet to the key reached none of the remaining duplicate connections")
	}
	drainCheck := time.After(300 * time.Millisecond)
	for {
		select {
		case ev := <-sender.events:
			if pg, ok := ev.msg.(derp.PeerGoneMessage); ok && pg.Peer == dupPriv.Public() {
				t.Fatalf("sender got PeerGone for the duplicated key while 2 of its connections are still open")
			}
			continue
		case <-drainCheck:
		}
		break
	}
}
