package legacy

import (
	"context"
	"net/netip"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/google/uuid"
	"nhooyr.io/websocket"

	"github.com/coder/coder/v2/tailnet"
	"github.com/coder/coder/v2/tailnet/proto"

	"tailnetd.test/interop/harness"
)

// payloadSize is the bytes moved each way per data test (TAILNETD_LEGACY_BYTES overrides).
func payloadSize() int {
	if s := os.Getenv("TAILNETD_LEGACY_BYTES"); s != "" {
		if n, err := strconv.Atoi(s); err == nil && n > 0 {
			return n
		}
	}
	return 4 << 20
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// TestV1AgentV1Client: a v1 agent (/me/coordinate, no version, cookie auth) and a v1 client
// (/{agent}/coordinate, no version, Coder-Session-Token), both exchanging JSON nodes with
// tailnet.ServeCoordinator, DERP map from /api/v2/derp-map; data over tailnetd's DERP relay.
func TestV1AgentV1Client(t *testing.T) {
	dev := startDev(t)
	ctx := testCtx(t)
	agentID := uuid.MustParse(dev.AgentID)

	derpMap := fetchDERPMapV1(ctx, t, dev.BaseURL)
	checkDERPMap(t, derpMap, dev.HTTPAddr)

	agentConn := newConn(t, "v1-agent", agentID, agentAddrs(agentID), derpMap)
	agent := serveV1(ctx, t, "v1-agent", agentConn, mustURL(t, dev.BaseURL, "/api/v2/workspaceagents/me/coordinate"),
		dev.AgentToken, true, keyedID)
	agentSent := make(chan [32]byte, 4)
	serveData(t, agentConn, agentSent)

	clientConn := newConn(t, "v1-client", uuid.Nil, []netip.Addr{tailnet.IP()}, derpMap)
	client := serveV1(ctx, t, "v1-client", clientConn,
		mustURL(t, dev.BaseURL, "/api/v2/workspaceagents/"+agentID.String()+"/coordinate"),
		dev.ClientToken, false, func(*tailnet.Node) uuid.UUID { return agentID })

	agentNode := waitNode(ctx, t, agentConn)
	clientNode := waitNode(ctx, t, clientConn)
	harness.WaitFor(ctx, t, "client receives the agent's node", func() bool { return client.sawKey(agentNode.Key.String()) })
	harness.WaitFor(ctx, t, "agent receives the client's node", func() bool { return agent.sawKey(clientNode.Key.String()) })

	pingViaDERP(ctx, t, clientConn, tailnet.IPFromUUID(agentID))
	exchange(ctx, t, clientConn, tailnet.IPFromUUID(agentID), payloadSize(), agentSent)
	// v1-era clients dialled the legacy fixed agent address; it must work as well.
	exchange(ctx, t, clientConn, agentAddrs(agentID)[0], 64<<10, agentSent)

	for _, p := range []*v1Peer{agent, client} {
		if err := p.err(); err != nil {
			t.Errorf("%s: ServeCoordinator error: %v", p.name, err)
		}
		for i, a := range p.received() {
			for _, n := range a {
				if n == nil {
					t.Errorf("%s: array %d holds a null node", p.name, i)
				}
			}
		}
	}
}

// TestV1AgentV2Client: mixed generations. The agent is v1 JSON; the client is Coder v2.15.0's
// own v2 client stack (/{agent}/coordinate?version=2.0, yamux + dRPC, StreamDERPMaps,
// RemoteCoordination with the agent as tunnel destination).
func TestV1AgentV2Client(t *testing.T) {
	dev := startDev(t)
	ctx := testCtx(t)
	agentID := uuid.MustParse(dev.AgentID)

	derpMap := fetchDERPMapV1(ctx, t, dev.BaseURL)
	agentConn := newConn(t, "v1-agent", agentID, agentAddrs(agentID), derpMap)
	agent := serveV1(ctx, t, "v1-agent", agentConn, mustURL(t, dev.BaseURL, "/api/v2/workspaceagents/me/coordinate"),
		dev.AgentToken, true, keyedID)
	agentSent := make(chan [32]byte, 4)
	serveData(t, agentConn, agentSent)
	agentNode := waitNode(ctx, t, agentConn)

	rpc := dialV2Client(ctx, t, dev.BaseURL, dev.ClientToken, agentID)
	clientMap := firstDERPMapV2(ctx, t, rpc)
	checkDERPMap(t, clientMap, dev.HTTPAddr)
	clientConn := newConn(t, "v2-client", uuid.Nil, []netip.Addr{tailnet.IP()}, clientMap)
	sess := coordinateV2(ctx, t, "v2-client", rpc, clientConn, agentID)
	clientNode := waitNode(ctx, t, clientConn)

	harness.WaitFor(ctx, t, "v1 agent receives the v2 client's node", func() bool { return agent.sawKey(clientNode.Key.String()) })
	harness.WaitFor(ctx, t, "v2 client receives the v1 agent's node", func() bool { return sess.stream.sawKind(proto.CoordinateResponse_PeerUpdate_NODE) })
	_ = agentNode
	// A v1 agent cannot ack; tailnetd's v1 adapter sends ready_for_handshake on its behalf
	// (coordinator/src/v1), so the v2 client need not sit out its 5 s readyForHandshakeTimeout.
	harness.WaitFor(ctx, t, "v2 client receives READY_FOR_HANDSHAKE for the v1 agent",
		func() bool { return sess.stream.sawKind(proto.CoordinateResponse_PeerUpdate_READY_FOR_HANDSHAKE) })

	start := time.Now()
	pingViaDERP(ctx, t, clientConn, tailnet.IPFromUUID(agentID))
	t.Logf("v2 client reached the v1 agent %v after READY_FOR_HANDSHAKE", time.Since(start))
	exchange(ctx, t, clientConn, tailnet.IPFromUUID(agentID), payloadSize(), agentSent)
	if err := agent.err(); err != nil {
		t.Errorf("v1 agent: ServeCoordinator error: %v", err)
	}
}

// TestV2AgentV1Client: the other mix. The agent is Coder v2.15.0's v2 agent stack
// (agentsdk.ConnectRPC on /me/rpc, RemoteCoordination without a tunnel target, so it acks
// clients with ReadyForHandshake); the client is v1 JSON.
func TestV2AgentV1Client(t *testing.T) {
	dev := startDev(t)
	ctx := testCtx(t)
	agentID := uuid.MustParse(dev.AgentID)

	rpc := dialV2Agent(ctx, t, dev.BaseURL, dev.AgentToken)
	agentMap := firstDERPMapV2(ctx, t, rpc)
	checkDERPMap(t, agentMap, dev.HTTPAddr)
	agentConn := newConn(t, "v2-agent", agentID, agentAddrs(agentID), agentMap)
	sess := coordinateV2(ctx, t, "v2-agent", rpc, agentConn, uuid.Nil)
	agentSent := make(chan [32]byte, 4)
	serveData(t, agentConn, agentSent)
	agentNode := waitNode(ctx, t, agentConn)

	derpMap := fetchDERPMapV1(ctx, t, dev.BaseURL)
	clientConn := newConn(t, "v1-client", uuid.Nil, []netip.Addr{tailnet.IP()}, derpMap)
	client := serveV1(ctx, t, "v1-client", clientConn,
		mustURL(t, dev.BaseURL, "/api/v2/workspaceagents/"+agentID.String()+"/coordinate"),
		dev.ClientToken, false, func(*tailnet.Node) uuid.UUID { return agentID })

	harness.WaitFor(ctx, t, "v1 client receives the v2 agent's node", func() bool { return client.sawKey(agentNode.Key.String()) })
	harness.WaitFor(ctx, t, "v2 agent receives the v1 client's node", func() bool { return sess.stream.sawKind(proto.CoordinateResponse_PeerUpdate_NODE) })

	pingViaDERP(ctx, t, clientConn, tailnet.IPFromUUID(agentID))
	exchange(ctx, t, clientConn, tailnet.IPFromUUID(agentID), payloadSize(), agentSent)
	if err := client.err(); err != nil {
		t.Errorf("v1 client: ServeCoordinator error: %v", err)
	}
}

// TestV1ClientFirstAgentReconnects: the order and churn v1-era sessions lived with. The client
// connects before the agent exists; the agent comes up later (the client must be sent its node);
// then the agent restarts with a fresh tailnet.Conn (new node key, new coordination WebSocket),
// as a restarted v1 agent did, and the still-connected client must be sent the new node and
// reach it again.
func TestV1ClientFirstAgentReconnects(t *testing.T) {
	dev := startDev(t)
	ctx := testCtx(t)
	agentID := uuid.MustParse(dev.AgentID)
	derpMap := fetchDERPMapV1(ctx, t, dev.BaseURL)

	clientConn := newConn(t, "v1-client", uuid.Nil, []netip.Addr{tailnet.IP()}, derpMap)
	client := serveV1(ctx, t, "v1-client", clientConn,
		mustURL(t, dev.BaseURL, "/api/v2/workspaceagents/"+agentID.String()+"/coordinate"),
		dev.ClientToken, false, func(*tailnet.Node) uuid.UUID { return agentID })
	clientNode := waitNode(ctx, t, clientConn)

	for gen := 1; gen <= 2; gen++ {
		agentConn := newConn(t, "v1-agent-"+strconv.Itoa(gen), agentID, agentAddrs(agentID), derpMap)
		agent := serveV1(ctx, t, "v1-agent-"+strconv.Itoa(gen), agentConn,
			mustURL(t, dev.BaseURL, "/api/v2/workspaceagents/me/coordinate"), dev.AgentToken, true, keyedID)
		agentSent := make(chan [32]byte, 4)
		serveData(t, agentConn, agentSent)
		agentNode := waitNode(ctx, t, agentConn)
		harness.WaitFor(ctx, t, "client receives agent generation "+strconv.Itoa(gen)+"'s node",
			func() bool { return client.sawKey(agentNode.Key.String()) })
		harness.WaitFor(ctx, t, "agent generation "+strconv.Itoa(gen)+" receives the client's node",
			func() bool { return agent.sawKey(clientNode.Key.String()) })
		pingViaDERP(ctx, t, clientConn, tailnet.IPFromUUID(agentID))
		exchange(ctx, t, clientConn, tailnet.IPFromUUID(agentID), 1<<20, agentSent)
		if err := agent.err(); err != nil {
			t.Errorf("agent generation %d: ServeCoordinator error: %v", gen, err)
		}
		// The restart: coordination socket and tailnet.Conn both go away.
		_ = agent.ws.Close(websocket.StatusGoingAway, "")
		_ = agentConn.Close()
	}
	if err := client.err(); err != nil {
		t.Errorf("client: ServeCoordinator error: %v", err)
	}
}
