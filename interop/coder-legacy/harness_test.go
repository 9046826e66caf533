package legacy

// Process harness: build (or take $TAILNETD_BIN), start `tailnetd dev`, read its one JSON
// announcement line, keep its last log lines, and print them with the case name whenever a test
// or subtest fails. Nothing here speaks a coordination protocol.

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

const (
	logTailLines = 100
	startTimeout = 30 * time.Second
	stopTimeout  = 15 * time.Second
)

// announcement is the JSON line `tailnetd dev` prints on stdout once every listener is bound.
type announcement struct {
	HTTPAddr      string `json:"http_addr"`
	BaseURL       string `json:"base_url"`
	DERPURL       string `json:"derp_url"`
	DERPPublicKey string `json:"derp_public_key"`
	AgentID       string `json:"agent_id"`
	AgentToken    string `json:"agent_token"`
	ClientToken   string `json:"client_token"`
}

// TestMain makes results uncacheable: they depend on the tailnetd binary, which go test's result
// cache cannot see. Opening a file written a moment ago makes go test refuse to cache the run.
func TestMain(m *testing.M) {
	stamp := filepath.Join(os.TempDir(), "tailnetd-interop-coder-legacy.stamp")
	if err := os.WriteFile(stamp, []byte(time.Now().String()), 0o600); err == nil {
		if f, err := os.Open(stamp); err == nil {
			_ = f.Close()
		}
	}
	os.Exit(m.Run())
}

var (
	buildOnce sync.Once
	builtBin  string
	buildErr  error
)

// tailnetdBinary returns $TAILNETD_BIN or runs `cargo build -p tailnetd` once per test binary.
func tailnetdBinary(t testing.TB) string {
	t.Helper()
	if bin := os.Getenv("TAILNETD_BIN"); bin != "" {
		return bin
	}
	buildOnce.Do(func() {
		wd, err := os.Getwd()
		if err != nil {
			buildErr = err
			return
		}
		root := filepath.Join(wd, "..", "..") // interop/coder-legacy is two levels below the workspace
		cmd := exec.Command("cargo", "build", "-p", "tailnetd")
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("cargo build -p tailnetd: %w\n%s", err, lastLines(string(out), 60))
			return
		}
		builtBin = filepath.Join(root, "target", "debug", "tailnetd")
	})
	if buildErr != nil {
		t.Fatalf("building tailnetd: %v", buildErr)
	}
	return builtBin
}

var ansi = regexp.MustCompile(`\x1b\[[0-9;]*m`)

// logRing keeps the last lines of tailnetd's stderr.
type logRing struct {
	mu    sync.Mutex
	lines []string
	next  int
	full  bool
}

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

func (r *logRing) tail(n int) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var all []string
	if r.full {
		all = append(append(all, r.lines[r.next:]...), r.lines[:r.next]...)
	} else {
		all = append(all, r.lines[:r.next]...)
	}
	if len(all) > n {
		all = all[len(all)-n:]
	}
	return all
}

// tailnetd is one running `tailnetd dev` process.
type tailnetd struct {
	bin    string
	args   []string
	logs   *logRing
	cmd    *exec.Cmd
	exited chan struct{}
	info   announcement
}

func logFilter() string {
	if f := os.Getenv("TAILNETD_TEST_LOG"); f != "" {
		return f
	}
	return "info,coordinator=debug"
}

// startDev runs `tailnetd dev` on ephemeral loopback ports and waits for its announcement. The
// process is stopped (SIGTERM) when the test ends; if the test failed, tailnetd's last log
// lines are printed with the test's name.
func startDev(t *testing.T) *tailnetd {
	t.Helper()
	s := &tailnetd{
		bin:  tailnetdBinary(t),
		args: []string{"dev", "--http-addr", "127.0.0.1:0", "--stun-addr", "127.0.0.1:0", "--log", logFilter()},
		logs: &logRing{lines: make([]string, 4*logTailLines)},
	}
	t.Cleanup(func() {
		s.stop(t)
		if t.Failed() || os.Getenv("TAILNETD_TEST_DUMP_LOGS") != "" {
			verdict := "FAILED CASE"
			if !t.Failed() {
				verdict = "case (passed)"
			}
			lines := s.logs.tail(logTailLines)
			t.Logf("%s %s: last %d tailnetd log lines (%s %s):\n%s", verdict, t.Name(), len(lines),
				s.bin, strings.Join(s.args, " "), strings.Join(lines, "\n"))
		}
	})
	if err := s.start(); err != nil {
		t.Fatalf("starting tailnetd: %v", err)
	}
	for k, v := range map[string]string{"base_url": s.info.BaseURL, "agent_id": s.info.AgentID,
		"agent_token": s.info.AgentToken, "client_token": s.info.ClientToken} {
		if v == "" {
			t.Fatalf("dev announcement lacks %s: %+v", k, s.info)
		}
	}
	return s
}

func (s *tailnetd) start() error {
	cmd := exec.Command(s.bin, s.args...)
	cmd.Env = append(os.Environ(), "NO_COLOR=1", "RUST_BACKTRACE=1")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	s.cmd = cmd
	s.exited = make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64*1024), 1<<20)
		for sc.Scan() {
			s.logs.add(sc.Text())
		}
	}()
	lineCh := make(chan string, 1)
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
			s.logs.add("[stdout after the announcement] " + sc.Text())
		}
		if first {
			close(lineCh)
		}
	}()
	go func() {
		wg.Wait()
		_ = cmd.Wait()
		close(s.exited)
	}()
	select {
	case line, ok := <-lineCh:
		if !ok {
			<-s.exited
			return fmt.Errorf("tailnetd exited before announcing (%v); log tail:\n%s",
				cmd.ProcessState, strings.Join(s.logs.tail(logTailLines), "\n"))
		}
		if err := json.Unmarshal([]byte(line), &s.info); err != nil {
			_ = cmd.Process.Kill()
			return fmt.Errorf("announcement line %q is not JSON: %w", line, err)
		}
		s.logs.add("[harness] announcement: " + line)
		return nil
	case <-time.After(startTimeout):
		_ = cmd.Process.Kill()
		return fmt.Errorf("no announcement within %v", startTimeout)
	}
}

// stop sends SIGTERM and waits for the drain (contract: exit 0).
func (s *tailnetd) stop(t *testing.T) {
	if s.cmd == nil {
		return
	}
	select {
	case <-s.exited:
	default:
		_ = s.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-s.exited:
		case <-time.After(stopTimeout):
			t.Errorf("tailnetd did not exit within %v of SIGTERM; killing it", stopTimeout)
			_ = s.cmd.Process.Kill()
			<-s.exited
		}
	}
	if st := s.cmd.ProcessState; st != nil && !st.Success() {
		t.Errorf("tailnetd did not exit cleanly after SIGTERM: %v", st)
	}
	s.cmd = nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
