package coderdinterop

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/coder/coder/v2/codersdk"
)

// TestThroughTailnetd: one coderd, tailnetd in front, one agent; every feature a user reaches
// through tailnetd's address. The features coderd serves by dialing the agent itself (web
// terminal, listening ports, apps) need tailnetd's bridge into coderd's coordinator.
func TestThroughTailnetd(t *testing.T) {
	t.Parallel()
	s := newScenario(t, viaTailnetd)
	ctx := context.Background()

	t.Run("AgentConnectedTimes", func(t *testing.T) {
		t.Parallel()
		ctx, cancel := context.WithTimeout(ctx, checkTimeout)
		defer cancel()
		a := s.waitAgentConnected(ctx, time.Time{})
		if a.FirstConnectedAt == nil || a.LastConnectedAt == nil {
			t.Fatalf("connected agent without first/last connected times: %+v", a)
		}
		if a.DisconnectedAt != nil {
			t.Errorf("connected agent has a disconnected time %v", a.DisconnectedAt)
		}
		if a.LastConnectedAt.Before(*a.FirstConnectedAt) {
			t.Errorf("last connected %v before first connected %v", a.LastConnectedAt, a.FirstConnectedAt)
		}
		if time.Since(*a.FirstConnectedAt) > 5*time.Minute || time.Until(*a.FirstConnectedAt) > time.Minute {
			t.Errorf("first connected %v is not around now", a.FirstConnectedAt)
		}
		// coderd refreshes last-connected while the agent's session is alive.
		later := s.waitAgentConnected(ctx, a.LastConnectedAt.Add(time.Millisecond))
		if later.FirstConnectedAt == nil || !later.FirstConnectedAt.Equal(*a.FirstConnectedAt) {
			t.Errorf("first connected moved from %v to %v while connected", a.FirstConnectedAt, later.FirstConnectedAt)
		}
	})
	t.Run("LifecycleReady", func(t *testing.T) {
		t.Parallel()
		if err := s.checkLifecycleReady(ctx); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("Metadata", func(t *testing.T) {
		t.Parallel()
		if err := s.checkMetadata(ctx, time.Time{}); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("StartupLogs", func(t *testing.T) {
		t.Parallel()
		if err := s.checkStartupLogs(ctx); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("DialAgentEcho", func(t *testing.T) {
		t.Parallel()
		if err := s.checkDialAgent(ctx, nil); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("WebTerminal", func(t *testing.T) {
		t.Parallel()
		if err := s.checkTerminal(ctx); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("ListeningPorts", func(t *testing.T) {
		t.Parallel()
		if err := s.checkListeningPorts(ctx); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("WorkspaceApp", func(t *testing.T) {
		t.Parallel()
		if err := s.checkApp(ctx); err != nil {
			t.Fatal(err)
		}
	})
	// A client's PostTelemetry (sent to tailnetd on its coordination connection) reaches
	// coderd's telemetry reporter. (Coder v2.36.1's agent never calls PostTelemetry: only
	// clients dialed with telemetry on do, on pings, SSH and speed tests.)
	t.Run("ClientTelemetryReachesCoderd", func(t *testing.T) {
		t.Parallel()
		if err := s.checkTelemetry(ctx); err != nil {
			t.Fatal(err)
		}
	})
}

// TestCoderdRestart: coderd goes away mid-run and comes back on the same address and
// database. (Today tailnetd ends the agent's session when the agent's upstream session to
// coderd ends, and the agent redials.) coderd must show the agent connected again, and the
// terminal and tunnels must work again.
func TestCoderdRestart(t *testing.T) {
	t.Parallel()
	s := newScenario(t, viaTailnetd)
	ctx := context.Background()
	before, err := s.agentState(ctx)
	if err != nil {
		t.Fatal(err)
	}

	restartedAt := time.Now()
	s.restartCoderd()

	t.Run("AgentConnectedAgain", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(ctx, 2*checkTimeout)
		defer cancel()
		a := s.waitAgentConnected(ctx, restartedAt)
		if before.FirstConnectedAt == nil || a.FirstConnectedAt == nil || !a.FirstConnectedAt.Equal(*before.FirstConnectedAt) {
			t.Errorf("first connected changed across the coderd restart: %v -> %v", before.FirstConnectedAt, a.FirstConnectedAt)
		}
	})
	runAfterRestart(t, s, restartedAt)
}

// TestTailnetdRestart: tailnetd restarts (SIGTERM, same address and relay key); the agent
// reconnects to it, and coderd and clients recover.
func TestTailnetdRestart(t *testing.T) {
	t.Parallel()
	s := newScenario(t, viaTailnetd)
	ctx := context.Background()
	before, err := s.agentState(ctx)
	if err != nil {
		t.Fatal(err)
	}

	restartedAt := time.Now()
	s.tailnetd.restart()

	t.Run("AgentConnectedAgain", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(ctx, 2*checkTimeout)
		defer cancel()
		a := s.waitAgentConnected(ctx, restartedAt)
		if before.FirstConnectedAt == nil || a.FirstConnectedAt == nil || !a.FirstConnectedAt.Equal(*before.FirstConnectedAt) {
			t.Errorf("first connected changed across the tailnetd restart: %v -> %v", before.FirstConnectedAt, a.FirstConnectedAt)
		}
	})
	runAfterRestart(t, s, restartedAt)
}

func runAfterRestart(t *testing.T, s *scenario, restartedAt time.Time) {
	ctx := context.Background()
	checks := []struct {
		name  string
		check func(context.Context) error
	}{
		{"DialAgentEcho", func(ctx context.Context) error { return s.checkDialAgent(ctx, nil) }},
		{"WebTerminal", s.checkTerminal},
		{"ListeningPorts", s.checkListeningPorts},
		{"MetadataCollectedAfterRestart", func(ctx context.Context) error { return s.checkMetadata(ctx, restartedAt) }},
	}
	t.Run("After", func(t *testing.T) {
		for _, c := range checks {
			t.Run(c.name, func(t *testing.T) {
				t.Parallel()
				if err := c.check(ctx); err != nil {
					t.Fatal(err)
				}
			})
		}
	})
	if a, err := s.agentState(ctx); err == nil && a.Status != codersdk.WorkspaceAgentConnected {
		t.Errorf("agent %s at the end", a.Status)
	} else if err != nil {
		t.Error(fmt.Errorf("agent state at the end: %w", err))
	}
}

// TestControlDirectToCoderd is the control for the checks above: the agent and the user talk
// to coderd directly (coderd coordinates everything itself; its DERP map is still tailnetd's
// relay). The checks that fail through tailnetd without the bridge pass here, so their
// failures there are tailnetd's, not the harness's; it also shows that coderd's own tailnet
// reaches an agent homed on tailnetd's relay.
func TestControlDirectToCoderd(t *testing.T) {
	t.Parallel()
	s := newScenario(t, directToCoderd)
	ctx := context.Background()
	checks := []struct {
		name  string
		check func(context.Context) error
	}{
		{"DialAgentEcho", func(ctx context.Context) error { return s.checkDialAgent(ctx, nil) }},
		{"WebTerminal", s.checkTerminal},
		{"ListeningPorts", s.checkListeningPorts},
		{"WorkspaceApp", s.checkApp},
		{"StartupLogs", s.checkStartupLogs},
		{"ClientTelemetryReachesCoderd", func(ctx context.Context) error { return s.checkTelemetry(ctx) }},
	}
	for _, c := range checks {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			if err := c.check(ctx); err != nil {
				t.Fatal(err)
			}
		})
	}
}
