package coder

// The tailnetd process harness: build (or take $TAILNETD_BIN), start, read the one JSON
// announcement line, keep the last log lines, restart, and print the log tail with the case name
// whenever a test fails. Nothing here speaks any protocol; that is left to Coder's libraries.

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"
)

const (
	logTailLines = 100
	// startTimeout bounds how long tailnetd may take to print its announcement line.
	startTimeout = 30 * time.Second
	// stopTimeout bounds the SIGTERM drain.
	stopTimeout = 15 * time.Second
)

// announcement is the JSON line tailnetd prints on stdout once every listener is bound.
type announcement struct {
	Role          string  `json:"role"`
	HTTPAddr      string  `json:"http_addr"`
	HTTPSAddr     *string `json:"https_addr"`
	STUNAddr      *string `json:"stun_addr"`
	DERPPublicKey string  `json:"derp_public_key"`
	BaseURL       string  `json:"base_url"`
	DERPURL       string  `json:"derp_url"`
	AgentID       string  `json:"agent_id"`
	AgentToken    string  `json:"agent_token"`
	ClientToken   string  `json:"client_token"`
}

// TestMain makes this package's results uncacheable: they depend on the tailnetd binary, which
// go test's result cache cannot see (it only tracks files the test opens). Opening a file
// written a moment ago makes go test refuse to cache the run ("file too new").
func TestMain(m *testing.M) {
	stamp := filepath.Join(os.TempDir(), "tailnetd-interop-coder.stamp")
	if err := os.WriteFile(stamp, []byte(time.Now().String()), 0o600); err == nil {
		if f, err := os.Open(stamp); err == nil {
			_ = f.Close()
		}
	}
	os.Exit(m.Run())
}

// The kernel's parent-death signal is tied to the OS thread that forked the child, so tailnetd
// is started from one goroutine locked to a thread that never exits: if the test binary dies
// without running its cleanups (a panic, a timeout), tailnetd gets SIGKILL instead of lingering.
var spawnReqs = make(chan spawnReq)

type spawnReq struct {
	cmd  *exec.Cmd
	done chan error
}

func init() {
	go func() {
		runtime.LockOSThread() // never unlocked: this thread lives as long as the process
		for r := range spawnReqs {
			r.done <- r.cmd.Start()
		}
	}()
}

func startOnSpawnerThread(cmd *exec.Cmd) error {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	done := make(chan error, 1)
	spawnReqs <- spawnReq{cmd: cmd, done: done}
	return <-done
}

var (
	buildOnce sync.Once
	builtBin  string
	buildErr  error
)

// repoRoot is the Rust workspace root: interop/coder is two levels below it.
func repoRoot() (string, error) {
	wd, err := os.Getwd()
	if err != nil {
		return "", err
	}
	return filepath.Abs(filepath.Join(wd, "..", ".."))
}

// tailnetdBinary returns $TAILNETD_BIN or builds `cargo build -p tailnetd` once per test run.
func tailnetdBinary(t testing.TB) string {
	t.Helper()
	if bin := os.Getenv("TAILNETD_BIN"); bin != "" {
		return bin
	}
	buildOnce.Do(func() {
		root, err := repoRoot()
		if err != nil {
			buildErr = err
			return
		}
		cmd := exec.Command("cargo", "build", "-p", "tailnetd")
		cmd.Dir = root
		out, err := cmd.CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("cargo build -p tailnetd: %w\n%s", err, tailLines(string(out), 60))
			return
		}
		builtBin = filepath.Join(root, "target", "debug", "tailnetd")
	})
	if buildErr != nil {
		t.Fatalf("building tailnetd: %v", buildErr)
	}
	return builtBin
}

// logRing keeps the last N lines of tailnetd's stderr across restarts.
type logRing struct {
	mu    sync.Mutex
	lines []string
	next  int
	full  bool
}

func newLogRing(n int) *logRing { return &logRing{lines: make([]string, n)} }

var ansi = regexp.MustCompile(`\x1b\[[0-9;]*m`)

func (r *logRing) add(line string) {
	line = ansi.ReplaceAllString(line, "")
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lines[r.next] = line
	r.next = (r.next + 1) % len(r.lines)
	if r.next == 0 {
		r.full = true
	}
}

func (r *logRing) tail() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.full {
		return append([]string(nil), r.lines[:r.next]...)
	}
	return append(append([]string(nil), r.lines[r.next:]...), r.lines[:r.next]...)
}

// grep returns every kept line containing s.
func (r *logRing) grep(s string) []string {
	var out []string
	for _, l := range r.tail() {
		if strings.Contains(l, s) {
			out = append(out, l)
		}
	}
	return out
}

// tailnetd is one running (or restartable) tailnetd process.
type tailnetd struct {
	t    testing.TB
	bin  string
	args []string
	logs *logRing
	// configPath is the --config file of a `serve` instance (rewritable before restart()).
	configPath string

	mu      sync.Mutex
	cmd     *exec.Cmd
	exited  chan struct{}
	exitErr error
	info    announcement
	dumps   int // log tails printed so far
}

// logFilter is passed as --log; TAILNETD_TEST_LOG overrides it.
func logFilter() string {
	if f := os.Getenv("TAILNETD_TEST_LOG"); f != "" {
		return f
	}
	return "info,coordinator=debug"
}

// startTailnetd runs `tailnetd <args...>` and waits for its announcement. The process is stopped
// when the test ends; if the test failed, the last log lines are printed with the test name.
func startTailnetd(t *testing.T, args ...string) *tailnetd {
	t.Helper()
	keep := 4 * logTailLines
	if os.Getenv("TAILNETD_TEST_DUMP_LOGS") != "" {
		keep = 100000
	}
	s := &tailnetd{t: t, bin: tailnetdBinary(t), args: args, logs: newLogRing(keep)}
	// Registered first so it runs last, after the process is gone and every client closed.
	dumpLogs(t, s, true)
	t.Cleanup(func() { s.stop(false) })
	if err := s.start(); err != nil {
		t.Fatalf("starting tailnetd: %v", err)
	}
	return s
}

// dumpLogsOnFailure prints the case name and tailnetd's log tail if t (a test or subtest) fails
// (TAILNETD_TEST_DUMP_LOGS=1: the whole log, always).
func dumpLogsOnFailure(t *testing.T, s *tailnetd) { dumpLogs(t, s, false) }

func dumpLogs(t *testing.T, s *tailnetd, owner bool) {
	t.Cleanup(func() {
		all := os.Getenv("TAILNETD_TEST_DUMP_LOGS") != ""
		if !t.Failed() && !all {
			return
		}
		s.mu.Lock()
		already := s.dumps
		s.dumps++
		s.mu.Unlock()
		if owner && already > 0 && !all {
			t.Logf("FAILED CASE %s: tailnetd's log tail was printed with the failing subtest(s) above", t.Name())
			return
		}
		lines := s.logs.tail()
		if len(lines) > logTailLines && !all {
			lines = lines[len(lines)-logTailLines:]
		}
		verdict := "FAILED CASE"
		if !t.Failed() {
			verdict = "case (passed)"
		}
		t.Logf("%s %s: last %d tailnetd log lines (%s %s):\n%s",
			verdict, t.Name(), len(lines), s.bin, strings.Join(s.args, " "), strings.Join(lines, "\n"))
	})
}

func (s *tailnetd) start() error {
	args := append(append([]string(nil), s.args...), "--log", logFilter())
	cmd := exec.Command(s.bin, args...)
	cmd.Env = append(os.Environ(), "NO_COLOR=1", "RUST_BACKTRACE=1")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return err
	}
	if err := startOnSpawnerThread(cmd); err != nil {
		return err
	}
	exited := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64*1024), 1<<20)
		for sc.Scan() {
			s.logs.add(sc.Text())
		}
	}()
	lineCh := make(chan string, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 64*1024), 1<<20)
		first := true
		for sc.Scan() {
			if first {
				lineCh <- sc.Text()
				first = false
				continue
			}
			s.logs.add("[stdout, after the announcement] " + sc.Text())
		}
		if first {
			close(lineCh)
		}
	}()
	go func() {
		wg.Wait()
		err := cmd.Wait()
		s.mu.Lock()
		s.exitErr = err
		s.mu.Unlock()
		close(exited)
	}()
	s.mu.Lock()
	s.cmd = cmd
	s.exited = exited
	s.mu.Unlock()

	select {
	case line, ok := <-lineCh:
		if !ok {
			<-exited
			s.mu.Lock()
			exitErr := s.exitErr
			s.mu.Unlock()
			return fmt.Errorf("tailnetd exited before announcing (%v); log tail:\n%s", exitErr,
				strings.Join(s.logs.tail(), "\n"))
		}
		var info announcement
		if err := json.Unmarshal([]byte(line), &info); err != nil {
			_ = cmd.Process.Kill()
			return fmt.Errorf("announcement line %q is not JSON: %w", line, err)
		}
		if info.HTTPAddr == "" || info.BaseURL == "" {
			_ = cmd.Process.Kill()
			return fmt.Errorf("announcement line %q lacks http_addr/base_url", line)
		}
		s.mu.Lock()
		s.info = info
		s.mu.Unlock()
		s.logs.add("[harness] announcement: " + line)
		return nil
	case <-time.After(startTimeout):
		_ = cmd.Process.Kill()
		return fmt.Errorf("no announcement within %v", startTimeout)
	}
}

// stop sends SIGTERM and waits for the drain; wantClean reports a non-zero exit as an error.
func (s *tailnetd) stop(wantClean bool) {
	s.mu.Lock()
	cmd, exited := s.cmd, s.exited
	s.mu.Unlock()
	if cmd == nil {
		return
	}
	select {
	case <-exited:
	default:
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(stopTimeout):
			s.t.Errorf("tailnetd did not exit within %v of SIGTERM; killing it", stopTimeout)
			_ = cmd.Process.Kill()
			<-exited
		}
	}
	s.mu.Lock()
	err := s.exitErr
	s.cmd = nil
	s.mu.Unlock()
	if wantClean && err != nil {
		s.t.Errorf("tailnetd did not exit cleanly after SIGTERM: %v (contract: SIGTERM drains and exits 0)", err)
	}
}

// restart stops the process with SIGTERM (expecting exit 0) and starts it again with the same
// arguments. Callers pin --http-addr/--stun-addr so the new process listens on the same ports.
func (s *tailnetd) restart() {
	s.t.Helper()
	s.stop(true)
	s.logs.add("[harness] ---- restart ----")
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := s.start()
		if err == nil {
			return
		}
		// The old listener may linger for a moment; retry only on "address in use".
		if time.Now().After(deadline) || !strings.Contains(err.Error(), "in use") {
			s.t.Fatalf("restarting tailnetd: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (s *tailnetd) announcement() announcement {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.info
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
// so that restart() brings the same relay identity back on the same address.
func startServe(t *testing.T, cfg staticConfig) *tailnetd {
	t.Helper()
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "tailnetd.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg.toml()), 0o600); err != nil {
		t.Fatal(err)
	}
	s := startTailnetd(t, "serve",
		"--config", cfgPath,
		"--http-addr", freeTCPAddr(t),
		"--stun-addr", freeUDPAddr(t),
		"--key-file", filepath.Join(dir, "derp.key"),
	)
	s.configPath = cfgPath
	return s
}

// rewriteConfig replaces the configuration the next restart() reads.
func (s *tailnetd) rewriteConfig(cfg staticConfig) {
	s.t.Helper()
	if err := os.WriteFile(s.configPath, []byte(cfg.toml()), 0o600); err != nil {
		s.t.Fatal(err)
	}
}

// startDev runs `tailnetd dev` on ephemeral ports.
func startDev(t *testing.T) *tailnetd {
	t.Helper()
	s := startTailnetd(t, "dev", "--http-addr", "127.0.0.1:0", "--stun-addr", "127.0.0.1:0")
	info := s.announcement()
	for k, v := range map[string]string{"agent_id": info.AgentID, "agent_token": info.AgentToken,
		"client_token": info.ClientToken, "derp_url": info.DERPURL, "derp_public_key": info.DERPPublicKey} {
		if v == "" {
			t.Fatalf("dev announcement lacks %s: %+v", k, info)
		}
	}
	return s
}

func freeTCPAddr(t testing.TB) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func freeUDPAddr(t testing.TB) string {
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.LocalAddr().String()
}

func tailLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// waitFor polls cond until it holds or ctx ends.
func waitFor(ctx context.Context, t testing.TB, what string, cond func() bool) {
	t.Helper()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("timed out waiting for %s", what)
		case <-tick.C:
		}
	}
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
