package coderdinterop

// The tailnetd process: start `tailnetd serve --upstream ...` from $TAILNETD_BIN, read its JSON
// announcement line, keep its log tail (printed when a test fails), restart it on the same
// address and key. Deliberately small and self-contained so that it can later be swapped for
// the shared interop harness.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

const (
	tailnetdStartTimeout = 30 * time.Second
	tailnetdStopTimeout  = 15 * time.Second
	tailnetdLogLines     = 150
)

// tailnetdAnnouncement is the JSON line tailnetd prints on stdout once its listeners are bound.
type tailnetdAnnouncement struct {
	Role     string `json:"role"`
	HTTPAddr string `json:"http_addr"`
	BaseURL  string `json:"base_url"`
	DERPURL  string `json:"derp_url"`
}

// The kernel's parent-death signal is tied to the OS thread that forked the child, so tailnetd
// is started from one goroutine locked to a thread that never exits: if the test binary dies
// without its cleanups, tailnetd gets SIGKILL instead of lingering.
var spawnRequests = make(chan spawnRequest)

type spawnRequest struct {
	cmd  *exec.Cmd
	done chan error
}

func init() {
	go func() {
		runtime.LockOSThread() // never unlocked: this thread lives as long as the process
		for r := range spawnRequests {
			r.done <- r.cmd.Start()
		}
	}()
}

func startOnSpawnerThread(cmd *exec.Cmd) error {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	done := make(chan error, 1)
	spawnRequests <- spawnRequest{cmd: cmd, done: done}
	return <-done
}

// tailnetdBinary returns $TAILNETD_BIN, or ../../target/debug/tailnetd when that exists.
func tailnetdBinary(t testing.TB) string {
	t.Helper()
	if bin := os.Getenv("TAILNETD_BIN"); bin != "" {
		return bin
	}
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(wd, "..", "..", "target", "debug", "tailnetd")
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("set TAILNETD_BIN to a built tailnetd (cargo build --bin tailnetd): %v", err)
	}
	return bin
}

// upstreamBridgeArgs are the extra flags for the coderd bridge: TAILNETD_UPSTREAM_BRIDGE=off runs
// tailnetd with the bridge switched off (to show which features depend on it); unset or "on"
// leaves tailnetd's default.
func upstreamBridgeArgs(t testing.TB) []string {
	switch v := os.Getenv("TAILNETD_UPSTREAM_BRIDGE"); v {
	case "", "on":
		return nil
	case "off":
		return []string{"--upstream-bridge=false"}
	default:
		t.Fatalf("TAILNETD_UPSTREAM_BRIDGE=%q: want on or off", v)
		return nil
	}
}

type tailnetdProcess struct {
	t    testing.TB
	bin  string
	args []string

	logMu sync.Mutex
	logs  []string

	mu      sync.Mutex
	cmd     *exec.Cmd
	exited  chan struct{}
	exitErr error
	info    tailnetdAnnouncement
}

// startTailnetdServe runs `tailnetd serve` on addr (fixed, so a restart comes back on it) with
// coderd at upstreamURL, a key file (the relay keeps its identity across restarts), no STUN.
func startTailnetdServe(t *testing.T, addr, upstreamURL string) *tailnetdProcess {
	t.Helper()
	args := []string{"serve",
		"--http-addr", addr,
		"--stun-addr", "",
		"--upstream", upstreamURL,
		"--key-file", filepath.Join(t.TempDir(), "derp.key"),
		// metric() reads /metrics from the base URL; no fixed metrics port (tests run at once).
		"--metrics-addr", "",
		"--metrics-on-public-listener", "true",
		"--log", tailnetdLogFilter(),
	}
	args = append(args, upstreamBridgeArgs(t)...)
	p := &tailnetdProcess{t: t, bin: tailnetdBinary(t), args: args}
	t.Cleanup(func() {
		p.stop()
		if t.Failed() || os.Getenv("TAILNETD_TEST_DUMP_LOGS") != "" {
			t.Logf("last tailnetd log lines (%s %s):\n%s", p.bin, strings.Join(p.args, " "),
				strings.Join(p.logTail(), "\n"))
		}
	})
	if err := p.start(); err != nil {
		t.Fatalf("starting tailnetd: %v", err)
	}
	return p
}

func tailnetdLogFilter() string {
	if f := os.Getenv("TAILNETD_TEST_LOG"); f != "" {
		return f
	}
	return "info,coordinator=debug"
}

func (p *tailnetdProcess) addLog(line string) {
	p.logMu.Lock()
	defer p.logMu.Unlock()
	p.logs = append(p.logs, line)
	if len(p.logs) > 4*tailnetdLogLines {
		p.logs = append([]string(nil), p.logs[len(p.logs)-tailnetdLogLines:]...)
	}
}

func (p *tailnetdProcess) logTail() []string {
	p.logMu.Lock()
	defer p.logMu.Unlock()
	if len(p.logs) > tailnetdLogLines {
		return append([]string(nil), p.logs[len(p.logs)-tailnetdLogLines:]...)
	}
	return append([]string(nil), p.logs...)
}

func (p *tailnetdProcess) start() error {
	cmd := exec.Command(p.bin, p.args...)
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
	var readers sync.WaitGroup
	readers.Add(2)
	go func() {
		defer readers.Done()
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64*1024), 1<<20)
		for sc.Scan() {
			p.addLog(sc.Text())
		}
	}()
	firstLine := make(chan string, 1)
	go func() {
		defer readers.Done()
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 64*1024), 1<<20)
		first := true
		for sc.Scan() {
			if first {
				firstLine <- sc.Text()
				first = false
				continue
			}
			p.addLog("[stdout] " + sc.Text())
		}
		if first {
			close(firstLine)
		}
	}()
	go func() {
		readers.Wait()
		err := cmd.Wait()
		p.mu.Lock()
		p.exitErr = err
		p.mu.Unlock()
		close(exited)
	}()
	p.mu.Lock()
	p.cmd, p.exited = cmd, exited
	p.mu.Unlock()

	select {
	case line, ok := <-firstLine:
		if !ok {
			<-exited
			return fmt.Errorf("tailnetd exited before announcing; log tail:\n%s", strings.Join(p.logTail(), "\n"))
		}
		var info tailnetdAnnouncement
		if err := json.Unmarshal([]byte(line), &info); err != nil || info.HTTPAddr == "" || info.BaseURL == "" {
			_ = cmd.Process.Kill()
			return fmt.Errorf("announcement line %q: not JSON with http_addr and base_url (%v)", line, err)
		}
		p.mu.Lock()
		p.info = info
		p.mu.Unlock()
		p.addLog("[harness] announcement: " + line)
		return nil
	case <-time.After(tailnetdStartTimeout):
		_ = cmd.Process.Kill()
		return fmt.Errorf("no announcement within %v", tailnetdStartTimeout)
	}
}

// stop sends SIGTERM, waits for the drain and returns the exit error (nil: exit 0).
func (p *tailnetdProcess) stop() error {
	p.mu.Lock()
	cmd, exited := p.cmd, p.exited
	p.mu.Unlock()
	if cmd == nil {
		return nil
	}
	select {
	case <-exited:
	default:
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(tailnetdStopTimeout):
			_ = cmd.Process.Kill()
			<-exited
			return fmt.Errorf("tailnetd did not exit within %v of SIGTERM; killed", tailnetdStopTimeout)
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cmd = nil
	return p.exitErr
}

// restart stops tailnetd (expecting a clean exit) and starts it again on the same address.
func (p *tailnetdProcess) restart() {
	p.t.Helper()
	if err := p.stop(); err != nil {
		p.t.Errorf("tailnetd did not exit cleanly after SIGTERM: %v", err)
	}
	p.addLog("[harness] ---- restart ----")
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := p.start()
		if err == nil {
			return
		}
		if time.Now().After(deadline) || !strings.Contains(err.Error(), "in use") {
			p.t.Fatalf("restarting tailnetd: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (p *tailnetdProcess) announcement() tailnetdAnnouncement {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.info
}

func freeTCPAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// metric returns the lines of tailnetd's /metrics for one metric (for failure messages).
func (p *tailnetdProcess) metric(ctx context.Context, name string) string {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.announcement().BaseURL+"/metrics", nil)
	if err != nil {
		return err.Error()
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Sprintf("/metrics: %v", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var lines []string
	for _, l := range strings.Split(string(body), "\n") {
		if strings.HasPrefix(l, name) {
			lines = append(lines, l)
		}
	}
	if len(lines) == 0 {
		return name + " absent from /metrics"
	}
	return strings.Join(lines, "; ")
}
