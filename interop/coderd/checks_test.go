package coderdinterop

// What a user does, through the scenario's front door only (tailnetd's address). Each check returns an error rather than
// failing the test, so that the same check runs before and after restarts.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"cdr.dev/slog/v3/sloggers/slogtest"
	"github.com/google/uuid"

	"github.com/coder/coder/v2/codersdk"
	"github.com/coder/coder/v2/codersdk/workspacesdk"
)

// checkTimeout bounds every check of a feature that goes through coderd's own tailnet: when
// coderd cannot reach the agent, its handlers wait until the request gives up.
const checkTimeout = 25 * time.Second

// checkTerminal opens the web terminal (`/pty` WebSocket, as the dashboard does), waits for
// the shell's prompt, runs a command and reads its output.
func (s *scenario) checkTerminal(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, checkTimeout)
	defer cancel()
	conn, err := workspacesdk.New(s.client).AgentReconnectingPTY(ctx, workspacesdk.WorkspaceAgentReconnectingPTYOpts{
		AgentID:   s.agentID,
		Reconnect: uuid.New(),
		Width:     80,
		Height:    24,
		Command:   "/bin/sh",
	})
	if err != nil {
		return fmt.Errorf("opening the web terminal: %w", err)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { _ = conn.Close() })
	defer stop()

	var out bytes.Buffer
	readUntil := func(what string) error {
		buf := make([]byte, 4096)
		for !strings.Contains(out.String(), what) {
			n, err := conn.Read(buf)
			out.Write(buf[:n])
			if err != nil {
				return fmt.Errorf("reading the terminal (waiting for %q, got %q): %w (context: %v)", what, out.String(), err, ctx.Err())
			}
		}
		return nil
	}
	// /bin/sh's prompt for root is "# ", for anyone else "$ ".
	if err := readUntilAny(conn, &out, []string{"# ", "$ "}); err != nil {
		return fmt.Errorf("waiting for the shell prompt (got %q): %w (context: %v)", out.String(), err, ctx.Err())
	}
	req, _ := json.Marshal(workspacesdk.ReconnectingPTYRequest{Data: "echo terminal-$((40+2))-ok\r"})
	if _, err := conn.Write(req); err != nil {
		return fmt.Errorf("typing into the terminal: %w", err)
	}
	// The echoed input shows "$((40+2))"; only the command's output has "42".
	return readUntil("terminal-42-ok")
}

func readUntilAny(r io.Reader, out *bytes.Buffer, wants []string) error {
	buf := make([]byte, 4096)
	for {
		for _, w := range wants {
			if strings.Contains(out.String(), w) {
				return nil
			}
		}
		n, err := r.Read(buf)
		out.Write(buf[:n])
		if err != nil {
			return err
		}
	}
}

// checkListeningPorts opens a port on the agent's side and waits for coderd's listening-ports
// answer to list it. Its budget exceeds coderd's own 30 s limit for reaching the agent, so a
// failure shows coderd's answer.
func (s *scenario) checkListeningPorts(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 35*time.Second)
	defer cancel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer ln.Close()
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	var lastErr error
	var last []codersdk.WorkspaceAgentListeningPort
	for {
		res, err := s.client.WorkspaceAgentListeningPorts(ctx, s.agentID)
		if err == nil {
			last = res.Ports
			for _, p := range res.Ports {
				if p.Port == port {
					return nil
				}
			}
		} else if lastErr == nil || ctx.Err() == nil {
			// Keep coderd's last answer rather than our own deadline cutting the next request.
			lastErr = err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("port %d never listed (last list %v, last error: %v)", port, last, lastErr)
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// checkApp requests the workspace app through coderd's path-based app proxy.
func (s *scenario) checkApp(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, checkTimeout)
	defer cancel()
	u := *s.frontURL
	u.Path = fmt.Sprintf("/@%s/%s.%s/apps/%s/", s.username, s.workspace.Name, agentName, appSlug)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return err
	}
	req.Header.Set(codersdk.SessionTokenHeader, s.client.SessionToken())
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("GET %s: %w", u.Path, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64*1024))
	if resp.StatusCode != http.StatusOK || string(body) != appBody {
		return fmt.Errorf("GET %s: %s, body %q; want 200 with %q", u.Path, resp.Status, trim(body, 600), appBody)
	}
	return nil
}

func trim(b []byte, n int) string {
	if len(b) > n {
		return string(b[:n]) + "..."
	}
	return string(b)
}

// checkDialAgent dials the agent from a client coordinating through tailnetd
// (workspacesdk.DialAgent) and echoes bytes over a TCP connection in the tunnel. With
// whileOpen set, the client has telemetry on, pings the agent (a ping is one of the events the
// client reports with PostTelemetry) and calls whileOpen before it closes: the client posts its
// events from background goroutines, and closing the connection ends its coordination session,
// so an event still on its way when the connection closes is lost by the client itself.
func (s *scenario) checkDialAgent(ctx context.Context, whileOpen func() error) error {
	telemetry := whileOpen != nil
	ctx, cancel := context.WithTimeout(ctx, checkTimeout)
	defer cancel()
	logger := slogtest.Make(s.t, &slogtest.Options{IgnoreErrors: true}).Leveled(logLevel()).Named("client")
	conn, err := workspacesdk.New(s.client).DialAgent(ctx, s.agentID, &workspacesdk.DialAgentOptions{
		Logger:          logger,
		EnableTelemetry: telemetry,
	})
	if err != nil {
		return fmt.Errorf("DialAgent: %w", err)
	}
	defer conn.Close()
	if !conn.AwaitReachable(ctx) {
		return fmt.Errorf("agent not reachable over the tunnel: %v", ctx.Err())
	}
	c, err := conn.DialContext(ctx, "tcp", s.echoAddr)
	if err != nil {
		return fmt.Errorf("dialing the echo port through the tunnel: %w", err)
	}
	defer c.Close()
	if d, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(d)
	}
	msg := "echo over the tunnel " + uuid.NewString() + "\n"
	if _, err := io.WriteString(c, msg); err != nil {
		return fmt.Errorf("writing to the echo port: %w", err)
	}
	got, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return fmt.Errorf("reading the echo: %w", err)
	}
	if got != msg {
		return fmt.Errorf("echo: got %q, want %q", got, msg)
	}
	if telemetry {
		if _, _, _, err := conn.Ping(ctx); err != nil {
			return fmt.Errorf("pinging the agent: %w", err)
		}
		return whileOpen()
	}
	return nil
}

// checkMetadata waits for the agent's metadata item, collected by the agent after notBefore and
// reported to coderd, in coderd's metadata stream.
func (s *scenario) checkMetadata(ctx context.Context, notBefore time.Time) error {
	ctx, cancel := context.WithTimeout(ctx, checkTimeout)
	defer cancel()
	updates, errs := s.client.WatchWorkspaceAgentMetadata(ctx, s.agentID)
	var last []codersdk.WorkspaceAgentMetadata
	for {
		select {
		case <-ctx.Done():
			return fmt.Errorf("metadata %q=%q collected after %v never arrived (last %+v)", metadataKey, metadataValue, notBefore, last)
		case err := <-errs:
			return fmt.Errorf("watching metadata: %w", err)
		case md := <-updates:
			last = md
			for _, m := range md {
				if m.Description.Key == metadataKey && strings.TrimSpace(m.Result.Value) == metadataValue && m.Result.Error == "" && !m.Result.CollectedAt.Before(notBefore) {
					return nil
				}
			}
		}
	}
}

// checkStartupLogs reads the agent's logs from coderd (`/logs`) until the start-up script's
// output is there.
func (s *scenario) checkStartupLogs(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, checkTimeout)
	defer cancel()
	var seen []string
	for {
		logs, closer, err := s.client.WorkspaceAgentLogsAfter(ctx, s.agentID, 0, false)
		if err != nil {
			return fmt.Errorf("reading agent logs: %w", err)
		}
		found := false
		seen = seen[:0]
		for batch := range logs {
			for _, l := range batch {
				seen = append(seen, l.Output)
				if strings.Contains(l.Output, startupLogMarker) {
					found = true
				}
			}
		}
		_ = closer.Close()
		if found {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("start-up log line %q never arrived (logs: %q)", startupLogMarker, seen)
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// checkLifecycleReady waits until coderd shows the agent's start-up finished ("ready").
func (s *scenario) checkLifecycleReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, checkTimeout)
	defer cancel()
	var last codersdk.WorkspaceAgent
	for {
		a, err := s.agentState(ctx)
		if err == nil {
			last = a
			if a.LifecycleState == codersdk.WorkspaceAgentLifecycleReady {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("agent lifecycle never ready (last %q, error %v)", last.LifecycleState, err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// checkTelemetry dials the agent with telemetry on, pings it, and waits, with the connection
// still open, for the client's network telemetry to reach coderd's telemetry reporter.
func (s *scenario) checkTelemetry(ctx context.Context) error {
	before := len(s.telemetry.networkEvents())
	return s.checkDialAgent(ctx, func() error {
		deadline := time.Now().Add(10 * time.Second)
		for len(s.telemetry.networkEvents()) == before {
			if time.Now().After(deadline) {
				return fmt.Errorf("no network telemetry reached coderd within 10 s (tailnetd's %s)",
					s.tailnetd.metric(ctx, "coordinator_telemetry_events_total"))
			}
			time.Sleep(100 * time.Millisecond)
		}
		return nil
	})
}
