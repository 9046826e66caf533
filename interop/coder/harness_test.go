package coder

// Starting tailnetd for these tests (`serve` with a static configuration, `dev`) through the
// shared process harness (tailnetd.test/interop/harness: binary, announcement, log tail, restart,
// SIGTERM contract), and the client-side network the tests can cut. Nothing here speaks any
// protocol; that is left to Coder's libraries.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/google/uuid"

	"tailnetd.test/interop/harness"
)

// logFilter is tailnetd's log filter (TAILNETD_TEST_LOG overrides it).
const logFilter = "info,coordinator=debug"

func TestMain(m *testing.M) { harness.Main(m) }

// tailnetd is one running (or restartable) tailnetd process.
type tailnetd struct {
	*harness.Process
	// configPath is the --config file of a `serve` instance (rewritable before Restart).
	configPath string
}

// startTailnetd runs `tailnetd <args...>` and waits for its announcement, which must carry
// base_url and the fields named in require. The process is stopped when the test ends; if the
// test failed, the last log lines are printed with the test name.
func startTailnetd(t *testing.T, require []string, args ...string) *tailnetd {
	t.Helper()
	// A non-zero exit at cleanup is not judged here (Restart checks the SIGTERM drain): tailnetd
	// installs its SIGTERM handler only after announcing, so a case that ends within milliseconds
	// of the start can see it die of the signal instead of draining.
	return &tailnetd{Process: harness.Start(t, harness.Options{
		Args:      args,
		LogFilter: logFilter,
		Require:   append([]string{"base_url"}, require...),
	})}
}

// staticConfig is a `tailnetd serve` configuration with fixed credentials and a fixed resume
// key, so that tokens survive restarts and the harness can use Coder's own resume-token code
// with the same key.
type staticConfig struct {
	Agents    []staticAgent
	UserToken string
	// RestrictedUserToken may reach only Agents[0] (written when there is at least one agent).
	RestrictedUserToken string
	ResumeKeyID         string
	ResumeKey           []byte
}

type staticAgent struct {
	ID    uuid.UUID
	Token uuid.UUID
}

func newStaticConfig(nAgents int) staticConfig {
	c := staticConfig{UserToken: randomUserToken(), RestrictedUserToken: randomUserToken(),
		ResumeKeyID: "1", ResumeKey: make([]byte, 64)}
	if _, err := rand.Read(c.ResumeKey); err != nil {
		panic(err)
	}
	for range nAgents {
		c.Agents = append(c.Agents, staticAgent{ID: uuid.New(), Token: uuid.New()})
	}
	return c
}

// randomUserToken returns a token in Coder's API key shape: 10 chars, '-', 22 chars.
func randomUserToken() string {
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

func (c staticConfig) toml() string {
	var sb strings.Builder
	for _, a := range c.Agents {
		fmt.Fprintf(&sb, "[[auth.agents]]\ntoken = %q\nid = %q\n\n", a.Token, a.ID)
	}
	fmt.Fprintf(&sb, "[[auth.users]]\ntoken = %q\nagents = \"all\"\n\n", c.UserToken)
	if len(c.Agents) > 0 {
		fmt.Fprintf(&sb, "[[auth.users]]\ntoken = %q\nname = \"restricted\"\nagents = [%q]\n\n", c.RestrictedUserToken, c.Agents[0].ID)
	}
	fmt.Fprintf(&sb, "[auth.resume_key]\nid = %q\nsecret_hex = %q\n", c.ResumeKeyID, hex.EncodeToString(c.ResumeKey))
	return sb.String()
}

// startServe writes cfg to a file and runs `tailnetd serve` on fixed free ports with a key file,
// so that Restart brings the same relay identity back on the same address.
func startServe(t *testing.T, cfg staticConfig) *tailnetd {
	t.Helper()
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "tailnetd.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg.toml()), 0o600); err != nil {
		t.Fatal(err)
	}
	s := startTailnetd(t, nil, "serve",
		"--config", cfgPath,
		"--http-addr", harness.FreeTCPAddr(t),
		"--stun-addr", harness.FreeUDPAddr(t),
		"--key-file", filepath.Join(dir, "derp.key"),
		// Tests run several sidecars at once: none binds the fixed default metrics port.
		"--metrics-addr", "",
	)
	s.configPath = cfgPath
	return s
}

// rewriteConfig replaces the configuration the next Restart reads.
func (s *tailnetd) rewriteConfig(t testing.TB, cfg staticConfig) {
	t.Helper()
	if err := os.WriteFile(s.configPath, []byte(cfg.toml()), 0o600); err != nil {
		t.Fatal(err)
	}
}

// startDev runs `tailnetd dev` on ephemeral ports; its announcement must carry the generated
// agent and its credentials and the relay.
func startDev(t *testing.T) *tailnetd {
	t.Helper()
	return startTailnetd(t, []string{"agent_id", "agent_token", "client_token", "derp_url", "derp_public_key"},
		"dev", "--http-addr", "127.0.0.1:0", "--stun-addr", "127.0.0.1:0")
}

var errKilled = errors.New("harness: network to tailnetd is down")

// killableNet is the client's "network" to tailnetd: every TCP connection the Coder libraries
// open through it can be cut at once (no WebSocket close, no Disconnect), and further dials fail
// until it is brought back up.
type killableNet struct {
	mu    sync.Mutex
	down  bool
	conns map[net.Conn]struct{}
}

func newKillableNet() *killableNet { return &killableNet{conns: map[net.Conn]struct{}{}} }

func (k *killableNet) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	k.mu.Lock()
	down := k.down
	k.mu.Unlock()
	if down {
		return nil, errKilled
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.down {
		_ = c.Close()
		return nil, errKilled
	}
	k.conns[c] = struct{}{}
	return &trackedConn{Conn: c, k: k}, nil
}

// kill closes every open connection abruptly and refuses new ones.
func (k *killableNet) kill() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.down = true
	for c := range k.conns {
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.SetLinger(0) // RST, like a dead network path seen from the server
		}
		_ = c.Close()
	}
	k.conns = map[net.Conn]struct{}{}
}

type trackedConn struct {
	net.Conn
	k    *killableNet
	once sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.k.mu.Lock()
		delete(c.k.conns, c.Conn)
		c.k.mu.Unlock()
	})
	return c.Conn.Close()
}

var _ io.Closer = (*trackedConn)(nil)
