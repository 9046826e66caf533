package tailscale

// A region of three tailnetd relays meshed over QUIC (--mesh-quic-addr, --mesh-quic-with; no
// DERP mesh at all), with Tailscale's derphttp clients on every relay: packets every way
// (datagrams, and a 60 KB packet that must take a stream), PeerGone across the mesh, and one
// relay killed with SIGKILL and started again on the same ports with the same key.

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"tailscale.com/types/key"

	"tailnetd.test/interop/harness"
)

// startQUICRegion starts n relays, each listing every relay's UDP address (itself included,
// which it skips) under one mesh key.
func (e *env) startQUICRegion(n int) []*tailnetd {
	t := e.t
	t.Helper()
	psk := make([]byte, 32)
	rand.Read(psk)
	pskFile := filepath.Join(e.dir, "mesh.key")
	if err := os.WriteFile(pskFile, []byte(hex.EncodeToString(psk)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	udp := make([]string, n)
	for i := range udp {
		udp[i] = harness.FreeUDPAddr(t)
	}
	with := strings.Join(udp, ",")
	relays := make([]*tailnetd, n)
	for i := range relays {
		relays[i] = e.start(serverOpts{
			// Fixed ports: a relay started again listens where clients and peers redial.
			httpAddr: harness.FreeTCPAddr(t),
			stunAddr: harness.FreeUDPAddr(t),
			keyFile:  filepath.Join(e.dir, fmt.Sprintf("derp%d.key", i)),
			metrics:  true,
			extraArgs: []string{
				"--mesh-psk-file", pskFile,
				"--mesh-quic-addr", udp[i],
				"--mesh-quic-with", with,
			},
		})
	}
	return relays
}

// waitQUICLinks waits until relay s has an outbound QUIC link up to each of the others.
func waitQUICLinks(t *testing.T, s *tailnetd, others int) {
	t.Helper()
	harness.WaitFor(ctxTimeout(t, 30*time.Second), t, "QUIC mesh links up", func() bool {
		return scrape(t, s, "derp_mesh_peer_connected") == float64(others)
	})
}

func TestQUICMeshThreeRelays(t *testing.T) {
	e := newEnv(t)
	relays := e.startQUICRegion(3)
	for _, s := range relays {
		waitQUICLinks(t, s, 2)
	}
	clients := make([]*peer, 0, 6)
	for i, s := range relays {
		for j := 0; j < 2; j++ {
			c := e.plainClient(fmt.Sprintf("r%dc%d", i, j), s, key.NewNode())
			c.connect(t, s)
			clients = append(clients, c)
		}
	}
	// First across each relay pair (presence needs a moment to cross), then every way.
	for _, a := range []int{0, 2, 4} {
		for _, b := range []int{0, 2, 4} {
			if a != b {
				deliverEventually(t, clients[a], clients[b], 20*time.Second)
			}
		}
	}
	allWays(t, clients)
	// Larger than any QUIC datagram: crosses on a stream of its own.
	big := payload(60_000)
	clients[0].send(t, clients[2].pub, big)
	clients[2].waitPacket(t, clients[0].pub, big)
	if got := scrape(t, relays[0], "derp_mesh_quic_stream_packets"); got < 1 {
		t.Errorf("derp_mesh_quic_stream_packets on relay 0 = %v, want >= 1", got)
	}
	if got := scrape(t, relays[0], "derp_mesh_forward_dropped"); got != 0 {
		t.Errorf("derp_mesh_forward_dropped on relay 0 = %v", got)
	}

	// PeerGone across the mesh: r0c1 sent to every other client (allWays); when it leaves,
	// the clients on relays 1 and 2 hear it from their relays.
	gone := clients[1]
	gone.close()
	for _, c := range []*peer{clients[2], clients[3], clients[4], clients[5]} {
		waitPeerGone(t, c, gone.pub)
	}

	// Relay 2 dies (SIGKILL: no goodbye on the mesh). The others notice the dead link, drop
	// its routes, and tell their clients that got packets from its clients.
	relays[2].Kill()
	waitPeerGone(t, clients[0], clients[4].pub)
	waitPeerGone(t, clients[2], clients[5].pub)
	// Same key file and ports: its clients reconnect by themselves, the links come back.
	relays[2].StartAgain(t)
	for _, c := range []*peer{clients[4], clients[5]} {
		c.waitFor(t, 15*time.Second, "a message on a new connection", true, func(ev event) bool {
			return ev.err == nil && ev.gen > 1
		})
	}
	for _, s := range relays {
		waitQUICLinks(t, s, 2)
	}
	live := []*peer{clients[0], clients[2], clients[3], clients[4], clients[5]}
	for _, a := range []*peer{clients[0], clients[2], clients[4]} {
		for _, b := range []*peer{clients[0], clients[2], clients[4]} {
			if a != b {
				deliverEventually(t, a, b, 30*time.Second)
			}
		}
	}
	allWays(t, live)
}
