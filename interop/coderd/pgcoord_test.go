package coderdinterop

// Interop with Coder's own HA coordinator (pgcoord, enterprise/tailnet at the pinned release):
// pgcoord runs in-process against a fresh database with Coder's migrations, tailnetd runs as
// `serve` with static auth (no upstream, so the bridge is off) on the same database, and real
// tailnet.Conns carry TCP across the two coordinators over tailnetd's relay.

import (
	"context"
	"crypto/rand"
	"database/sql"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"

	"cdr.dev/slog/v3"
	"cdr.dev/slog/v3/sloggers/slogtest"
	"github.com/coder/coder/v2/coderd/database"
	"github.com/coder/coder/v2/coderd/database/pubsub"
	"github.com/coder/coder/v2/codersdk"
	"github.com/coder/coder/v2/codersdk/workspacesdk"
	entailnet "github.com/coder/coder/v2/enterprise/tailnet"
	"github.com/coder/coder/v2/tailnet"
	"github.com/coder/websocket"
	"github.com/google/uuid"
	"tailscale.com/tailcfg"

	"tailnetd.test/interop/harness"
)

const pgcoordEchoPort = 4242

// startTailnetdReplica runs `tailnetd serve` with static auth on the database at pgURL.
func startTailnetdReplica(t *testing.T, pgURL string, agentID, agentToken uuid.UUID, userToken string) *harness.Process {
	t.Helper()
	dir := t.TempDir()
	cfg := fmt.Sprintf("[[auth.agents]]\ntoken = %q\nid = %q\n\n[[auth.users]]\ntoken = %q\nagents = \"all\"\n",
		agentToken, agentID, userToken)
	cfgPath := filepath.Join(dir, "tailnetd.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return harness.Start(t, harness.Options{
		Args: []string{"serve",
			"--config", cfgPath,
			"--postgres-url", pgURL,
			"--http-addr", harness.FreeTCPAddr(t),
			"--stun-addr", "",
			"--key-file", filepath.Join(dir, "derp.key"),
			"--metrics-addr", "",
		},
		LogFilter:    "info,coordinator=debug",
		Require:      []string{"base_url"},
		StartTimeout: 30 * time.Second,
		StopTimeout:  15 * time.Second,
	})
}

// startPGCoord runs Coder's pgcoord in-process on the database at pgURL.
func startPGCoord(ctx context.Context, t *testing.T, logger slog.Logger, pgURL string) tailnet.Coordinator {
	t.Helper()
	sqlDB, err := sql.Open("postgres", pgURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sqlDB.Close() })
	ps, err := pubsub.New(ctx, logger.Named("pubsub"), sqlDB, pgURL)
	if err != nil {
		t.Fatalf("pubsub: %v", err)
	}
	t.Cleanup(func() { _ = ps.Close() })
	coord, err := entailnet.NewPGCoord(ctx, logger.Named("pgcoord"), ps, database.New(sqlDB))
	if err != nil {
		t.Fatalf("NewPGCoord: %v", err)
	}
	t.Cleanup(func() { _ = coord.Close() })
	return coord
}

// tailnetdClient is a Coder client coordinating through tailnetd's
// /api/v2/workspaceagents/{agent}/coordinate, with DERP maps from tailnetd.
func tailnetdClient(t *testing.T, logger slog.Logger, baseURL string, agentID uuid.UUID, userToken string) *tailnet.Conn {
	t.Helper()
	u, err := url.Parse(baseURL)
	if err != nil {
		t.Fatal(err)
	}
	sdk := codersdk.New(u, codersdk.WithSessionToken(userToken))
	wsOptions := &websocket.DialOptions{CompressionMode: websocket.CompressionDisabled}
	sdk.SessionTokenProvider.SetDialOption(wsOptions)
	coordinateURL, err := u.Parse("/api/v2/workspaceagents/" + agentID.String() + "/coordinate")
	if err != nil {
		t.Fatal(err)
	}
	dialer := workspacesdk.NewWebsocketDialer(logger.Named("dialer"), coordinateURL, wsOptions)
	ctrl := tailnet.NewController(logger.Named("controller"), dialer)
	conn, err := tailnet.NewConn(&tailnet.Options{
		Addresses:      []netip.Prefix{netip.PrefixFrom(tailnet.TailscaleServicePrefix.RandomAddr(), 128)},
		Logger:         logger.Named("net"),
		BlockEndpoints: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	coordCtrl := tailnet.NewTunnelSrcCoordController(logger.Named("coord"), conn)
	coordCtrl.AddDestination(agentID)
	ctrl.CoordCtrl = coordCtrl
	ctrl.DERPCtrl = tailnet.NewBasicDERPController(logger.Named("derp"), workspacesdk.New(sdk), conn)
	runCtx, cancel := context.WithCancel(context.Background())
	ctrl.Run(runCtx)
	t.Cleanup(func() { cancel(); _ = conn.Close() })
	return conn
}

// pgcoordAgent is a Coder agent's tailnet.Conn coordinating through pgcoord in-process, on the
// DERP map tailnetd served to the client.
func pgcoordAgent(t *testing.T, logger slog.Logger, coord tailnet.Coordinator, agentID uuid.UUID, dm *tailcfg.DERPMap) *tailnet.Conn {
	t.Helper()
	conn, err := tailnet.NewConn(&tailnet.Options{
		Addresses:      []netip.Prefix{netip.PrefixFrom(tailnet.TailscaleServicePrefix.AddrFromUUID(agentID), 128)},
		DERPMap:        dm,
		Logger:         logger.Named("net"),
		BlockEndpoints: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	client := tailnet.NewInMemoryCoordinatorClient(logger.Named("coordclient"), agentID,
		tailnet.AgentCoordinateeAuth{ID: agentID}, coord)
	cw := tailnet.NewAgentCoordinationController(logger.Named("coord"), conn).New(client)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = cw.Close(ctx)
		_ = conn.Close()
	})
	return conn
}

func awaitDERPMap(ctx context.Context, t *testing.T, conn *tailnet.Conn) *tailcfg.DERPMap {
	t.Helper()
	for {
		if dm := conn.DERPMap(); dm != nil && len(dm.Regions) > 0 {
			return dm
		}
		select {
		case <-ctx.Done():
			t.Fatal("client got no DERP map from tailnetd")
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func serveTailnetEcho(t *testing.T, conn *tailnet.Conn) {
	t.Helper()
	ln, err := conn.Listen("tcp", fmt.Sprintf(":%d", pgcoordEchoPort))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func(c net.Conn) { defer c.Close(); _, _ = io.Copy(c, c) }(c)
		}
	}()
}

func echoOverTunnel(ctx context.Context, t *testing.T, client *tailnet.Conn, agentIP netip.Addr) {
	t.Helper()
	if !client.AwaitReachable(ctx, agentIP) {
		t.Fatalf("agent %s not reachable from the client", agentIP)
	}
	c, err := client.DialContextTCP(ctx, netip.AddrPortFrom(agentIP, pgcoordEchoPort))
	if err != nil {
		t.Fatalf("dial over the tunnel: %v", err)
	}
	defer c.Close()
	msg := []byte("hello across pgcoord and tailnetd")
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("echo read: %v", err)
	}
	if string(got) != string(msg) {
		t.Fatalf("echo: got %q, want %q", got, msg)
	}
}

// TestPGCoordAgentTailnetdClient: an agent coordinating through Coder's pgcoord and a client
// through tailnetd, on one database, carry TCP over the tunnel.
func TestPGCoordAgentTailnetdClient(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	logger := slogtest.Make(t, &slogtest.Options{IgnoreErrors: true}).Leveled(logLevel())

	pgURL := pgServer.NewDatabase(t)
	agentID, agentToken, userToken := uuid.New(), uuid.New(), randomAPIKey()
	tnd := startTailnetdReplica(t, pgURL, agentID, agentToken, userToken)
	coord := startPGCoord(ctx, t, logger, pgURL)

	client := tailnetdClient(t, logger.Named("client"), tnd.Announcement().BaseURL, agentID, userToken)
	dm := awaitDERPMap(ctx, t, client)
	agent := pgcoordAgent(t, logger.Named("agent"), coord, agentID, dm)
	serveTailnetEcho(t, agent)
	echoOverTunnel(ctx, t, client, tailnet.TailscaleServicePrefix.AddrFromUUID(agentID))
}

// randomAPIKey returns a token in Coder's API key shape: 10 chars, '-', 22 chars.
func randomAPIKey() string {
	const alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return string(b[:10]) + "-" + string(b[10:])
}
