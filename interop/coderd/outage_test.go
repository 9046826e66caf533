package coderdinterop

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"cdr.dev/slog/v3/sloggers/slogtest"
	"github.com/coder/coder/v2/codersdk"
	"github.com/coder/coder/v2/tailnet"
	"github.com/coder/coder/v2/tailnet/proto"
	"github.com/coder/websocket"
	"github.com/google/uuid"
)

// heldClientSession is a client's v2 coordination session to the agent (the one `coder ssh`
// opens: /{agent}/coordinate?version=2.0, yamux, dRPC Coordinate with AddTunnel), read
// continuously, recording every peer update of the agent and the first error.
type heldClientSession struct {
	mu      sync.Mutex
	updates []*proto.CoordinateResponse_PeerUpdate
	err     error
}

func (h *heldClientSession) snapshot() ([]*proto.CoordinateResponse_PeerUpdate, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]*proto.CoordinateResponse_PeerUpdate(nil), h.updates...), h.err
}

func holdClientSession(ctx context.Context, t *testing.T, s *scenario) *heldClientSession {
	t.Helper()
	u := *s.tailnetdURL
	u.Path = fmt.Sprintf("/api/v2/workspaceagents/%s/coordinate", s.agentID)
	u.RawQuery = "version=2.0"
	ws, res, err := websocket.Dial(ctx, u.String(), &websocket.DialOptions{
		HTTPHeader:      http.Header{codersdk.SessionTokenHeader: []string{s.client.SessionToken()}},
		CompressionMode: websocket.CompressionDisabled,
	})
	if err != nil {
		if res != nil {
			t.Fatalf("dial %s: %v (%v)", u.String(), err, codersdk.ReadBodyAsError(res))
		}
		t.Fatalf("dial %s: %v", u.String(), err)
	}
	t.Cleanup(func() { _ = ws.Close(websocket.StatusGoingAway, "") })
	logger := slogtest.Make(t, &slogtest.Options{IgnoreErrors: true}).Leveled(logLevel()).Named("held-client")
	client, err := tailnet.NewDRPCClient(websocket.NetConn(ctx, ws, websocket.MessageBinary), logger)
	if err != nil {
		t.Fatalf("NewDRPCClient: %v", err)
	}
	stream, err := client.Coordinate(ctx)
	if err != nil {
		t.Fatalf("Coordinate: %v", err)
	}
	if err := stream.Send(&proto.CoordinateRequest{AddTunnel: &proto.CoordinateRequest_Tunnel{Id: s.agentID[:]}}); err != nil {
		t.Fatalf("AddTunnel: %v", err)
	}
	h := &heldClientSession{}
	go func() {
		for {
			resp, err := stream.Recv()
			h.mu.Lock()
			if err != nil {
				h.err = err
				h.mu.Unlock()
				return
			}
			for _, up := range resp.GetPeerUpdates() {
				if uuid.UUID(up.GetId()) == s.agentID {
					h.updates = append(h.updates, up)
				}
			}
			h.mu.Unlock()
		}
	}()
	return h
}

// TestCoderdOutage: coderd goes down for a while and comes back (issue 19's fault). Through it:
// a client's coordination session stays open and is never ended by tailnetd; a new session
// whose token tailnetd has never seen gets 503 (it cannot be authenticated); the agent's session
// follows the sidecar rule (closed with its upstream session, redialled) and once coderd is back
// the agent is connected again and the held session receives the agent's node again, on the same
// session.
func TestCoderdOutage(t *testing.T) {
	t.Parallel()
	s := newScenario(t, viaTailnetd)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	// A token of the same user that tailnetd has not authenticated yet (no cached answer).
	fresh, err := s.client.CreateToken(ctx, codersdk.Me, codersdk.CreateTokenRequest{})
	if err != nil {
		t.Fatal(err)
	}

	held := holdClientSession(ctx, t, s)
	waitNode := func(what string, after int) int {
		t.Helper()
		deadline := time.Now().Add(time.Minute)
		for {
			ups, err := held.snapshot()
			if err != nil {
				t.Fatalf("the held client session ended (%s): %v", what, err)
			}
			for i := after; i < len(ups); i++ {
				if ups[i].GetKind() == proto.CoordinateResponse_PeerUpdate_NODE {
					return len(ups)
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("no node of the agent on the held session (%s); updates: %v", what, ups)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	seen := waitNode("before the outage", 0)

	// coderd down.
	s.coderdMu.Lock()
	old := s.coderd
	s.coderdMu.Unlock()
	s.fwd.setTarget("")
	old.close()
	downAt := time.Now()

	// A new session cannot be authenticated: 503 in Coder's JSON shape, and not a hang.
	u := *s.tailnetdURL
	u.Path = fmt.Sprintf("/api/v2/workspaceagents/%s/coordinate", s.agentID)
	u.RawQuery = "version=2.0"
	dialCtx, dialCancel := context.WithTimeout(ctx, 20*time.Second)
	_, res, err := websocket.Dial(dialCtx, u.String(), &websocket.DialOptions{
		HTTPHeader: http.Header{codersdk.SessionTokenHeader: []string{fresh.Key}},
	})
	dialCancel()
	if err == nil {
		t.Fatal("a new coordination session with an unseen token was upgraded while coderd was down")
	}
	if res == nil || res.StatusCode != http.StatusServiceUnavailable {
		status := "no response"
		if res != nil {
			status = res.Status
		}
		t.Fatalf("new session while coderd is down: %s (%v), want 503", status, err)
	}
	if e := codersdk.ReadBodyAsError(res); e == nil {
		t.Error("503 without Coder's JSON error body")
	} else {
		t.Logf("new session while coderd is down: %v", e)
	}

	// Stay down long enough for every upstream session to notice.
	time.Sleep(3 * time.Second)
	if _, err := held.snapshot(); err != nil {
		t.Fatalf("the held client session ended while coderd was down: %v", err)
	}

	// coderd back; the agent redials and is connected again.
	s.startCoderd()
	upAt := time.Now()
	s.waitAgentConnected(ctx, downAt)
	waitNode("after coderd came back", seen)
	t.Logf("coderd down %v; agent connected again and its node on the held session %v after coderd was back",
		upAt.Sub(downAt).Round(time.Millisecond), time.Since(upAt).Round(time.Millisecond))

	// The deployment works again: a new client reaches the agent.
	if err := s.checkDialAgent(ctx, nil); err != nil {
		t.Fatalf("dialing the agent after the outage: %v", err)
	}
	if _, err := held.snapshot(); err != nil {
		t.Fatalf("the held client session ended: %v", err)
	}
}
