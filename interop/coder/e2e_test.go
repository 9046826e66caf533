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
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/coder/coder/v2/codersdk"
	"github.com/coder/coder/v2/codersdk/agentsdk"
	"github.com/coder/coder/v2/codersdk/workspacesdk"
	"github.com/coder/coder/v2/tailnet"
	"github.com/coder/coder/v2/tailnet/proto"
	"github.com/coder/coder/v2/tailnet/test"

	"tailnetd.test/interop/harness"
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
// with endpoints blocked so every packet crosses tailnetd's DERP relay (Upgrade: DERP).
func TestEndToEnd(t *testing.T) {
	runEndToEnd(t, peerOpts{}, bulkSize)
}

// TestEndToEndDERPWebSockets: the same over DERP-over-WebSocket (Coder's derp_force_websockets,
// the path browsers-era proxies force).
func TestEndToEndDERPWebSockets(t *testing.T) {
	runEndToEnd(t, peerOpts{derpForceWebSockets: true}, 4<<20)
}

func runEndToEnd(t *testing.T, opts peerOpts, size int) {
	srv := startDev(t)
	info := srv.Announcement()
	agentID := uuid.MustParse(info.AgentID)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	agent := startRealAgent(t, info.BaseURL, agentID, info.AgentToken, opts)
	agentSide := serveDuplex(t, agent.Conn, func() int { return size })
	client := startRealClient(ctx, t, info.BaseURL, agentID, info.ClientToken, opts)

	awaitReachable(ctx, t, client.Conn, agent.IP(), "client")
	pingOverDERP(ctx, t, client.Conn, agent.IP())
	pingOverDERP(ctx, t, agent.Conn, client.IP)
	transfer(ctx, t, client, agent.IP(), agentSide, size, 1)

	// Coordination happened the way Coder's peers expect: the client got the agent's node and
	// the agent's ReadyForHandshake; the agent got the client's node and acknowledged it.
	clientID := client.peerID(ctx, t)
	if !client.Coord.sawUpdate(agentID, proto.CoordinateResponse_PeerUpdate_NODE) {
		t.Errorf("client never received a NODE update for the agent")
	}
	if !client.Coord.sawUpdate(agentID, proto.CoordinateResponse_PeerUpdate_READY_FOR_HANDSHAKE) {
		t.Errorf("client never received READY_FOR_HANDSHAKE from the agent (it fell back to its 5 s timer)")
	}
	if !agent.Coord.sawUpdate(clientID, proto.CoordinateResponse_PeerUpdate_NODE) {
		t.Errorf("agent never received a NODE update for the client %s", clientID)
	}
	if !agent.Coord.sentReadyForHandshake(clientID) {
		t.Errorf("agent never sent ready_for_handshake for the client %s", clientID)
	}
	for who, r := range map[string]*coordRecorder{"agent": agent.Coord, "client": client.Coord} {
		if e := r.errors(); len(e) > 0 {
			t.Errorf("%s received coordinator errors: %q", who, e)
		}
	}

	// The pings above emit telemetry; the client posts it with PostTelemetry.
	harness.WaitFor(ctx, t, "a successful PostTelemetry", func() bool {
		n, errs := client.Telemetry.counts()
		if len(errs) > 0 {
			t.Fatalf("PostTelemetry failed: %v", errs)
		}
		return n > 0
	})

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
	info := srv.Announcement()
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
		harness.DumpLogsOnFailure(t, srv.Process)
		agent := newAgent(t)
		client := startRealClient(ctx, t, info.BaseURL, agentID, info.ClientToken, peerOpts{})
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
		harness.DumpLogsOnFailure(t, srv.Process)
		agent := newAgent(t)
		client := startRealClient(ctx, t, info.BaseURL, agentID, info.ClientToken, peerOpts{})
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
	harness.WaitFor(ctx, t, "the client's preferred DERP region", func() bool {
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
	info := srv.Announcement()
	a := cfg.Agents[0]
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	resume := staticResumeProvider(cfg)

	agent := startRealAgent(t, info.BaseURL, a.ID, a.Token.String(), peerOpts{})
	agentSide := serveDuplex(t, agent.Conn, func() int { return smallSize })
	client := startRealClient(ctx, t, info.BaseURL, a.ID, cfg.UserToken, peerOpts{})
	awaitReachable(ctx, t, client.Conn, agent.IP(), "client")
	transfer(ctx, t, client, agent.IP(), agentSide, smallSize, 10)

	// The client's id, from a token tailnetd issued, checked with Coder's own verifier.
	harness.WaitFor(ctx, t, "a resume token", func() bool { return len(client.resume.received()) > 0 })
	toks := client.resume.received()
	idBefore, err := resume.VerifyResumeToken(ctx, toks[len(toks)-1].Token)
	if err != nil {
		t.Fatalf("tailnetd's resume token does not verify with Coder's verifier and the configured key: %v", err)
	}
	tokensBefore := len(toks)
	agentDialsBefore := agent.dialer.dialCount()
	requestsBefore := len(client.transport.requests())

	srv.Restart(t)
	if srv.Announcement().HTTPAddr != info.HTTPAddr || srv.Announcement().DERPPublicKey != info.DERPPublicKey {
		t.Fatalf("restarted tailnetd differs: before %+v after %+v", info, srv.Announcement())
	}

	harness.WaitFor(ctx, t, "the agent to redial /me/rpc", func() bool { return agent.dialer.dialCount() > agentDialsBefore })
	harness.WaitFor(ctx, t, "the client to redial and get a new resume token", func() bool {
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

	client2 := startRealClient(ctx, t, info.BaseURL, a.ID, cfg.UserToken, peerOpts{})
	awaitReachable(ctx, t, client2.Conn, agent.IP(), "new client after restart")
	transfer(ctx, t, client2, agent.IP(), agentSide, smallSize, 12)
}

// TestRestartResumeKeyRotated: tailnetd comes back with a different resume key, so the client's
// token no longer verifies. Coder's dialer must get a 401 whose validation names resume_token,
// drop the token, redial without it and carry on under a fresh peer id.
func TestRestartResumeKeyRotated(t *testing.T) {
	cfg := newStaticConfig(1)
	srv := startServe(t, cfg)
	info := srv.Announcement()
	a := cfg.Agents[0]
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	agent := startRealAgent(t, info.BaseURL, a.ID, a.Token.String(), peerOpts{})
	agentSide := serveDuplex(t, agent.Conn, func() int { return smallSize })
	client := startRealClient(ctx, t, info.BaseURL, a.ID, cfg.UserToken, peerOpts{})
	awaitReachable(ctx, t, client.Conn, agent.IP(), "client")
	harness.WaitFor(ctx, t, "a resume token", func() bool { return len(client.resume.received()) > 0 })
	toks := client.resume.received()
	idBefore, err := staticResumeProvider(cfg).VerifyResumeToken(ctx, toks[len(toks)-1].Token)
	if err != nil {
		t.Fatalf("resume token does not verify: %v", err)
	}
	tokensBefore := len(toks)
	requestsBefore := len(client.transport.requests())

	rotated := cfg
	rotated.ResumeKeyID = "2"
	rotated.ResumeKey = make([]byte, 64)
	copy(rotated.ResumeKey, newStaticConfig(0).ResumeKey)
	srv.rewriteConfig(t, rotated)
	srv.Restart(t)

	harness.WaitFor(ctx, t, "the client to redial and get a token under the new key", func() bool {
		return len(client.resume.received()) > tokensBefore
	})
	toks = client.resume.received()
	idAfter, err := staticResumeProvider(rotated).VerifyResumeToken(ctx, toks[len(toks)-1].Token)
	if err != nil {
		t.Fatalf("post-rotation token does not verify under the new key: %v", err)
	}
	if idAfter == idBefore {
		t.Errorf("client kept peer id %s although its resume token could not verify", idAfter)
	}
	var rejected, fresh bool
	for _, r := range client.transport.requests()[requestsBefore:] {
		if !strings.Contains(r, "/coordinate") {
			continue
		}
		if strings.HasPrefix(r, "401 ") && strings.Contains(r, "resume_token=") {
			rejected = true
		}
		if rejected && strings.HasPrefix(r, "101 ") && !strings.Contains(r, "resume_token=") {
			fresh = true
		}
	}
	if !rejected || !fresh {
		t.Errorf("want a 401 for the stale resume token, then a 101 without one; dials were:\n  %s",
			strings.Join(client.transport.requests()[requestsBefore:], "\n  "))
	}
	awaitReachable(ctx, t, client.Conn, agent.IP(), "client after rotation")
	transfer(ctx, t, client, agent.IP(), agentSide, smallSize, 20)
}

// TestDialErrors: the HTTP answers Coder's dialers act on before any WebSocket exists.
func TestDialErrors(t *testing.T) {
	srv := startDev(t)
	info := srv.Announcement()
	agentID := uuid.MustParse(info.AgentID)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	t.Run("ClientBadToken", func(t *testing.T) {
		harness.DumpLogsOnFailure(t, srv.Process)
		// Coder's WebsocketDialer treats 401 on the first dial as permanent.
		c := newRealClient(t, info.BaseURL, agentID, "abcdefghij-abcdefghijklmnopqrstuv", peerOpts{})
		var err error
		select {
		case err = <-c.dialer.Connected():
		case <-ctx.Done():
			t.Fatal("no answer to the first dial")
		}
		var sdkErr *codersdk.Error
		if !errors.As(err, &sdkErr) || sdkErr.StatusCode() != http.StatusUnauthorized {
			t.Fatalf("want a *codersdk.Error with 401, got %T %v", err, err)
		}
		t.Logf("client with a bad token: %v", err)
	})
	t.Run("AgentBadToken", func(t *testing.T) {
		harness.DumpLogsOnFailure(t, srv.Process)
		u, _ := url.Parse(info.BaseURL)
		client := agentsdk.New(u, agentsdk.WithFixedToken(uuid.NewString()))
		_, _, err := client.ConnectRPC210WithRole(ctx, "agent")
		var sdkErr *codersdk.Error
		if !errors.As(err, &sdkErr) || sdkErr.StatusCode() != http.StatusUnauthorized {
			t.Fatalf("want a *codersdk.Error with 401, got %T %v", err, err)
		}
		t.Logf("agent with a bad token: %v", err)
	})
	for _, c := range []struct{ name, path, token string }{
		{"ClientVersionTooNew", "/api/v2/workspaceagents/" + agentID.String() + "/coordinate?version=2.99", info.ClientToken},
		{"ClientMajorTooNew", "/api/v2/workspaceagents/" + agentID.String() + "/coordinate?version=3.0", info.ClientToken},
		{"AgentVersionTooNew", "/api/v2/workspaceagents/me/rpc?version=2.99&role=agent", info.AgentToken},
		{"AgentRPCVersion1", "/api/v2/workspaceagents/me/rpc?version=1.0&role=agent", info.AgentToken},
	} {
		t.Run(c.name, func(t *testing.T) {
			harness.DumpLogsOnFailure(t, srv.Process)
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, info.BaseURL+c.path, nil)
			req.Header.Set(codersdk.SessionTokenHeader, c.token)
			res, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer res.Body.Close()
			err = codersdk.ReadBodyAsError(res)
			var sdkErr *codersdk.Error
			if !errors.As(err, &sdkErr) {
				t.Fatalf("want a *codersdk.Error, got %T %v", err, err)
			}
			// workspacesdk.WebsocketDialer matches this message to explain a version mismatch.
			if sdkErr.StatusCode() != http.StatusBadRequest || sdkErr.Message != workspacesdk.AgentAPIMismatchMessage {
				t.Errorf("want 400 %q, got %d %q", workspacesdk.AgentAPIMismatchMessage, sdkErr.StatusCode(), sdkErr.Message)
			}
			if len(sdkErr.Validations) != 1 || sdkErr.Validations[0].Field != "version" {
				t.Errorf("want one validation on field \"version\", got %+v", sdkErr.Validations)
			}
			t.Logf("%s: %v", c.path, err)
		})
	}
}

// TestClientNotAllowed: a user who may not reach the agent gets Coder's 404 on
// {agent}/coordinate, which workspacesdk.WebsocketDialer treats as permanent.
func TestClientNotAllowed(t *testing.T) {
	cfg := newStaticConfig(2)
	srv := startServe(t, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c := newRealClient(t, srv.Announcement().BaseURL, cfg.Agents[1].ID, cfg.RestrictedUserToken, peerOpts{})
	var err error
	select {
	case err = <-c.dialer.Connected():
	case <-ctx.Done():
		t.Fatal("no answer to the first dial")
	}
	var sdkErr *codersdk.Error
	if !errors.As(err, &sdkErr) || sdkErr.StatusCode() != http.StatusNotFound {
		t.Fatalf("want a *codersdk.Error with 404, got %T %v", err, err)
	}
	t.Logf("restricted user, other agent: %v", err)
}
