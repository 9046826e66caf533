package coder

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/coder/coder/v2/tailnet"
	"github.com/coder/coder/v2/tailnet/proto"
	"github.com/coder/coder/v2/tailnet/test"
)

const (
	bulkSize  = 16 << 20 // bytes each way in TestEndToEnd
	smallSize = 1 << 20  // bytes each way after a restart
	echoPort  = 4242
)

// transferResult is what one side of a full-duplex transfer saw.
type transferResult struct {
	sentHash, recvHash string
	sent, recv         int64
	err                error
}

// pattern returns n deterministic pseudo-random bytes for seed.
func pattern(seed uint64, n int) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8), 1, 2, 3}))
	for i := 0; i+8 <= n; i += 8 {
		v := r.Uint64()
		for j := range 8 {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

func hashOf(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

type halfCloser interface {
	CloseWrite() error
}

// duplex writes out then half-closes while reading until EOF, hashing what it read.
func duplex(c net.Conn, out []byte) transferResult {
	var res transferResult
	res.sentHash = hashOf(out)
	var wg sync.WaitGroup
	var werr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		n, err := c.Write(out)
		res.sent = int64(n)
		if err != nil {
			werr = fmt.Errorf("write after %d bytes: %w", n, err)
			return
		}
		if hc, ok := c.(halfCloser); ok {
			werr = hc.CloseWrite()
		} else {
			werr = fmt.Errorf("%T cannot half-close", c)
		}
	}()
	h := sha256.New()
	n, rerr := io.Copy(h, c)
	res.recv = n
	res.recvHash = hex.EncodeToString(h.Sum(nil))
	wg.Wait()
	res.err = errors.Join(werr, rerr)
	return res
}

// serveDuplex accepts connections on the agent's tailnet listener; each one gets a full-duplex
// transfer of `size` bytes, and its result is reported on results.
func serveDuplex(t *testing.T, conn *tailnet.Conn, sizeFor func() int) <-chan transferResult {
	t.Helper()
	l, err := conn.Listen("tcp", fmt.Sprintf(":%d", echoPort))
	if err != nil {
		t.Fatalf("agent listen: %v", err)
	}
	t.Cleanup(func() { _ = l.Close() })
	results := make(chan transferResult, 8)
	go func() {
		for i := uint64(0); ; i++ {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func(c net.Conn, seed uint64) {
				defer c.Close()
				results <- duplex(c, pattern(1000+seed, sizeFor()))
			}(c, i)
		}
	}()
	return results
}

// transfer dials the agent over the tunnel and checks both directions byte for byte (by hash).
func transfer(ctx context.Context, t *testing.T, client *realClient, agentIP netip.Addr, agentSide <-chan transferResult, size int, seed uint64) {
	t.Helper()
	start := time.Now()
	c, err := client.Conn.DialContextTCP(ctx, netip.AddrPortFrom(agentIP, echoPort))
	if err != nil {
		t.Fatalf("dial agent over the tunnel: %v", err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	out := pattern(seed, size)
	mine := duplex(c, out)
	var theirs transferResult
	select {
	case theirs = <-agentSide:
	case <-ctx.Done():
		t.Fatalf("agent side never finished the transfer")
	}
	if mine.err != nil || theirs.err != nil {
		t.Fatalf("transfer errors: client: %v; agent: %v", mine.err, theirs.err)
	}
	if mine.sent != int64(size) || theirs.recv != int64(size) || mine.sentHash != theirs.recvHash {
		t.Errorf("client→agent corrupted: sent %d bytes (sha256 %s), agent got %d (sha256 %s)",
			mine.sent, mine.sentHash, theirs.recv, theirs.recvHash)
	}
	if theirs.sent != int64(size) || mine.recv != int64(size) || theirs.sentHash != mine.recvHash {
		t.Errorf("agent→client corrupted: agent sent %d bytes (sha256 %s), client got %d (sha256 %s)",
			theirs.sent, theirs.sentHash, mine.recv, mine.recvHash)
	}
	el := time.Since(start)
	t.Logf("transferred %d bytes each way in %v (%.1f MiB/s per direction)", size, el.Round(time.Millisecond),
		float64(size)/(1<<20)/el.Seconds())
}

// pingOverDERP pings dst from src over the tailnet and requires the answer to come through DERP.
func pingOverDERP(ctx context.Context, t *testing.T, from *tailnet.Conn, dst netip.Addr) {
	t.Helper()
	var lastErr error
	for ctx.Err() == nil {
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		d, p2p, res, err := from.Ping(pctx, dst)
		cancel()
		if err == nil {
			if p2p {
				t.Errorf("ping %s went peer-to-peer (endpoint %q) although both sides block endpoints", dst, res.Endpoint)
			}
			if res.DERPRegionID == 0 {
				t.Errorf("ping %s: result has no DERP region: %+v", dst, res)
			}
			t.Logf("ping %s: %v via DERP region %d (%s)", dst, d.Round(time.Microsecond), res.DERPRegionID, res.DERPRegionCode)
			return
		}
		lastErr = err
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("ping %s never succeeded: %v", dst, lastErr)
}

func awaitReachable(ctx context.Context, t *testing.T, c *tailnet.Conn, ip netip.Addr, who string) {
	t.Helper()
	start := time.Now()
	if !c.AwaitReachable(ctx, ip) {
		t.Fatalf("%s: %s never became reachable", who, ip)
	}
	t.Logf("%s: %s reachable after %v", who, ip, time.Since(start).Round(time.Millisecond))
}

// requireNoLibErrors fails if Coder's libraries logged an error while the connection should have
// been healthy.
func requireNoLibErrors(t *testing.T, who string, e *libErrors) {
	t.Helper()
	if got := e.snapshot(); len(got) > 0 {
		t.Errorf("%s: Coder's libraries logged errors during a healthy session:\n  %s", who, strings.Join(got, "\n  "))
	}
}

// TestEndToEnd: a real agent (/me/rpc, agent coordination controller) and a real `coder ssh`
// client ({agent}/coordinate, tunnel-source controller), both on DERP maps from StreamDERPMaps,
// with endpoints blocked so every packet crosses tailnetd's DERP relay.
func TestEndToEnd(t *testing.T) {
	srv := startDev(t)
	info := srv.announcement()
	agentID := uuid.MustParse(info.AgentID)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	agent := startRealAgent(t, info.BaseURL, agentID, info.AgentToken)
	agentSide := serveDuplex(t, agent.Conn, func() int { return bulkSize })
	client := startRealClient(ctx, t, info.BaseURL, agentID, info.ClientToken)

	awaitReachable(ctx, t, client.Conn, agent.IP(), "client")
	pingOverDERP(ctx, t, client.Conn, agent.IP())
	pingOverDERP(ctx, t, agent.Conn, client.IP)
	transfer(ctx, t, client, agent.IP(), agentSide, bulkSize, 1)

	// The DERP map both sides use came from tailnetd over StreamDERPMaps.
	for who, c := range map[string]*tailnet.Conn{"agent": agent.Conn, "client": client.Conn} {
		dm := c.DERPMap()
		if dm == nil || len(dm.Regions) == 0 {
			t.Errorf("%s has no DERP map from StreamDERPMaps", who)
			continue
		}
		for id, r := range dm.Regions {
			t.Logf("%s DERP map region %d %q embedded=%v nodes=%d", who, id, r.RegionCode, r.EmbeddedRelay, len(r.Nodes))
		}
	}
	if n := client.Conn.Node(); n == nil || n.PreferredDERP == 0 {
		t.Errorf("client node has no preferred DERP: %+v", n)
	}
	requireNoLibErrors(t, "agent", agent.Errs)
	requireNoLibErrors(t, "client", client.Errs)
}

// TestClientDisconnectAndLost: the agent side (Coder's test.Peer on the agent's /me/rpc
// Coordinate stream) sees DISCONNECTED when a real client exits gracefully and LOST when the
// client's connection dies without a Disconnect.
func TestClientDisconnectAndLost(t *testing.T) {
	srv := startDev(t)
	info := srv.announcement()
	agentID := uuid.MustParse(info.AgentID)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	coord := newCoordAdapter(t, info.BaseURL, map[uuid.UUID]string{agentID: info.AgentToken}, info.ClientToken, nil)
	// The agent side is a raw Coordinate stream on /me/rpc driven by Coder's test.Peer.
	newAgent := func(t *testing.T) *test.Peer {
		agentCtx, agentCancel := context.WithTimeout(ctx, 30*time.Second)
		t.Cleanup(agentCancel)
		agent := newAgentPeer(agentCtx, t, coord, agentID)
		t.Cleanup(func() { agent.Close(ctx) })
		agent.UpdateDERP(999)
		return agent
	}

	t.Run("Graceful", func(t *testing.T) {
		dumpLogsOnFailure(t, srv)
		agent := newAgent(t)
		client := startRealClient(ctx, t, info.BaseURL, agentID, info.ClientToken)
		clientID := client.peerID(ctx, t)
		region := awaitPreferredDERP(ctx, t, client.Conn)
		agent.AssertEventuallyHasDERP(clientID, int32(region))
		took := client.close()
		agent.AssertEventuallyDisconnected(clientID)
		agent.AssertNeverUpdateKind(clientID, proto.CoordinateResponse_PeerUpdate_LOST)
		// The controller sends Disconnect and then waits (1 s graceful timeout) for the server to
		// end the Coordinate stream; a server that ends it promptly lets it finish well before.
		if took >= 900*time.Millisecond {
			t.Errorf("graceful close took %v: tailnetd did not end the Coordinate stream promptly after Disconnect (the controller gave up at its 1 s graceful timeout)", took)
		} else {
			t.Logf("graceful close took %v", took)
		}
	})
	t.Run("Lost", func(t *testing.T) {
		dumpLogsOnFailure(t, srv)
		agent := newAgent(t)
		client := startRealClient(ctx, t, info.BaseURL, agentID, info.ClientToken)
		clientID := client.peerID(ctx, t)
		region := awaitPreferredDERP(ctx, t, client.Conn)
		agent.AssertEventuallyHasDERP(clientID, int32(region))
		client.net.kill() // every TCP connection to tailnetd reset; no WebSocket close, no Disconnect
		agent.AssertEventuallyLost(clientID)
	})
}

func awaitPreferredDERP(ctx context.Context, t *testing.T, c *tailnet.Conn) int {
	t.Helper()
	var region int
	waitFor(ctx, t, "the client's preferred DERP region", func() bool {
		if n := c.Node(); n != nil && n.PreferredDERP != 0 {
			region = n.PreferredDERP
			return true
		}
		return false
	})
	return region
}

// TestRestart: tailnetd is stopped with SIGTERM and started again on the same ports with the
// same key file and configuration. Both real peers redial on their own; the client presents its
// resume token and keeps its peer id; the tunnel carries data again and a new client can reach
// the agent (so the agent re-coordinated, not just the old WireGuard session surviving).
func TestRestart(t *testing.T) {
	cfg := newStaticConfig(1)
	srv := startServe(t, cfg)
	info := srv.announcement()
	a := cfg.Agents[0]
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	resume := staticResumeProvider(cfg)

	agent := startRealAgent(t, info.BaseURL, a.ID, a.Token.String())
	agentSide := serveDuplex(t, agent.Conn, func() int { return smallSize })
	client := startRealClient(ctx, t, info.BaseURL, a.ID, cfg.UserToken)
	awaitReachable(ctx, t, client.Conn, agent.IP(), "client")
	transfer(ctx, t, client, agent.IP(), agentSide, smallSize, 10)

	// The client's id, from a token tailnetd issued, checked with Coder's own verifier.
	waitFor(ctx, t, "a resume token", func() bool { return len(client.resume.received()) > 0 })
	toks := client.resume.received()
	idBefore, err := resume.VerifyResumeToken(ctx, toks[len(toks)-1].Token)
	if err != nil {
		t.Fatalf("tailnetd's resume token does not verify with Coder's verifier and the configured key: %v", err)
	}
	tokensBefore := len(toks)
	agentDialsBefore := agent.dialer.dialCount()
	requestsBefore := len(client.transport.requests())

	srv.restart()
	if srv.announcement().HTTPAddr != info.HTTPAddr || srv.announcement().DERPPublicKey != info.DERPPublicKey {
		t.Fatalf("restarted tailnetd differs: before %+v after %+v", info, srv.announcement())
	}

	waitFor(ctx, t, "the agent to redial /me/rpc", func() bool { return agent.dialer.dialCount() > agentDialsBefore })
	waitFor(ctx, t, "the client to redial and get a new resume token", func() bool {
		return len(client.resume.received()) > tokensBefore
	})
	redials := client.transport.requests()[requestsBefore:]
	usedToken := false
	for _, u := range redials {
		if strings.Contains(u, "/coordinate") && strings.Contains(u, "resume_token=") {
			usedToken = true
		}
	}
	if !usedToken {
		t.Errorf("client redialed without a resume token: %q", redials)
	}
	toks = client.resume.received()
	idAfter, err := resume.VerifyResumeToken(ctx, toks[len(toks)-1].Token)
	if err != nil {
		t.Fatalf("post-restart resume token does not verify: %v", err)
	}
	if idAfter != idBefore {
		t.Errorf("client peer id changed across the restart: %s → %s (resume token not honoured)", idBefore, idAfter)
	} else {
		t.Logf("client kept peer id %s across the restart", idAfter)
	}

	awaitReachable(ctx, t, client.Conn, agent.IP(), "client after restart")
	pingOverDERP(ctx, t, client.Conn, agent.IP())
	transfer(ctx, t, client, agent.IP(), agentSide, smallSize, 11)

	client2 := startRealClient(ctx, t, info.BaseURL, a.ID, cfg.UserToken)
	awaitReachable(ctx, t, client2.Conn, agent.IP(), "new client after restart")
	transfer(ctx, t, client2, agent.IP(), agentSide, smallSize, 12)
}
