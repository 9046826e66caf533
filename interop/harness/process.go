package harness

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

const (
	// LogTailLines is how many of tailnetd's last log lines a failing case prints.
	LogTailLines = 100
	// DefaultStartTimeout bounds the wait for the announcement line unless Options says otherwise.
	DefaultStartTimeout = 30 * time.Second
	// DefaultStopTimeout bounds the SIGTERM drain unless Options says otherwise.
	DefaultStopTimeout = 15 * time.Second
	// restartRetryFor bounds how long Restart retries while the old listener is still in use.
	restartRetryFor = 10 * time.Second
)

// Options describe one tailnetd process.
type Options struct {
	// Args follow the binary: the subcommand and its flags.
	Args []string
	// LogFilter is tailnetd's log filter, given as TAILNETD_LOG; TAILNETD_TEST_LOG overrides it.
	// Empty leaves tailnetd's default.
	LogFilter string
	// Require names the announcement fields the suite relies on (see Announcement.Require);
	// http_addr is always required. Checked on every (re)start.
	Require []string
	// StartTimeout bounds the wait for the announcement line (DefaultStartTimeout if zero).
	StartTimeout time.Duration
	// StopTimeout bounds the SIGTERM drain before SIGKILL (DefaultStopTimeout if zero).
	StopTimeout time.Duration
	// RequireCleanExit fails the test if, when it ends, the process does not exit with status 0
	// after SIGTERM. A process that has to be killed after StopTimeout fails the test either way.
	RequireCleanExit bool
}

// Process is one running (or restartable) tailnetd.
type Process struct {
	bin       string
	opts      Options
	logFilter string
	logs      *Ring

	mu       sync.Mutex
	cmd      *exec.Cmd // nil when stopped
	exited   chan struct{}
	exitErr  error
	info     Announcement
	infoLine string
	dumps    int // log tails printed so far
}

// Start runs tailnetd with opts and waits for its announcement; it fails t if that does not
// work. When t ends, a process the test did not stop itself gets SIGTERM and must exit within
// the stop timeout (with status 0 if opts.RequireCleanExit); if t failed, the last log lines are
// printed with the case name, after the process is gone.
func Start(t *testing.T, opts Options) *Process {
	t.Helper()
	if opts.StartTimeout == 0 {
		opts.StartTimeout = DefaultStartTimeout
	}
	if opts.StopTimeout == 0 {
		opts.StopTimeout = DefaultStopTimeout
	}
	keep := 4 * LogTailLines
	if dumpAll() {
		keep = 100000
	}
	p := &Process{bin: Binary(t), opts: opts, logFilter: opts.LogFilter, logs: NewRing(keep)}
	if f := os.Getenv("TAILNETD_TEST_LOG"); f != "" {
		p.logFilter = f
	}
	// Registered first so it runs last, after the process is gone and every client closed.
	dumpLogs(t, p, true)
	t.Cleanup(func() {
		if !p.running() {
			return // stopped by the test, which judged the exit itself
		}
		err := p.Stop()
		var killed *stopTimeoutError
		if errors.As(err, &killed) || (err != nil && opts.RequireCleanExit) {
			t.Errorf("tailnetd did not exit cleanly after SIGTERM: %v (contract: SIGTERM drains and exits 0)", err)
		}
	})
	if err := p.start(); err != nil {
		t.Fatalf("starting tailnetd: %v", err)
	}
	return p
}

// Announcement is the current process's announcement (it changes on Restart).
func (p *Process) Announcement() Announcement {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.info
}

// AnnouncementLine is the current process's announcement as printed.
func (p *Process) AnnouncementLine() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.infoLine
}

// Log is tailnetd's log (stderr, stdout after the announcement, and the harness's own notes),
// kept across restarts.
func (p *Process) Log() *Ring { return p.logs }

// CommandLine is the binary and its arguments, for messages.
func (p *Process) CommandLine() string {
	return strings.Join(append([]string{p.bin}, p.opts.Args...), " ")
}

// Stop sends SIGTERM and waits for the drain, killing the process after the stop timeout. It
// returns how the process ended: nil for exit status 0, an error for anything else (including
// being killed). Stopping a stopped process returns nil.
func (p *Process) Stop() error {
	p.mu.Lock()
	cmd, exited := p.cmd, p.exited
	p.mu.Unlock()
	if cmd == nil {
		return nil
	}
	var timedOut *stopTimeoutError
	select {
	case <-exited:
	default:
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(p.opts.StopTimeout):
			p.logs.Add(fmt.Sprintf("[harness] tailnetd did not exit within %v of SIGTERM; killing it", p.opts.StopTimeout))
			_ = cmd.Process.Kill()
			<-exited
			timedOut = &stopTimeoutError{after: p.opts.StopTimeout}
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cmd = nil
	if timedOut != nil {
		return timedOut
	}
	return p.exitErr
}

// Restart stops the process with SIGTERM (it must exit 0) and starts it again with the same
// options. Callers pin the listen addresses so the new process listens on the same ports; while
// the old listener lingers ("address in use") the start is retried for a while.
func (p *Process) Restart(t testing.TB) {
	t.Helper()
	if err := p.Stop(); err != nil {
		t.Errorf("tailnetd did not exit cleanly after SIGTERM: %v (contract: SIGTERM drains and exits 0)", err)
	}
	p.StartAgain(t)
}

// Kill ends the process with SIGKILL (no drain: what a crash or the OOM killer does) and waits
// for it to be gone. Killing a stopped process does nothing.
func (p *Process) Kill() {
	p.mu.Lock()
	cmd, exited := p.cmd, p.exited
	p.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Kill()
	<-exited
	p.mu.Lock()
	p.cmd = nil
	p.mu.Unlock()
	p.logs.Add("[harness] ---- killed (SIGKILL) ----")
}

// StartAgain starts a stopped or killed process again with the same options, retrying while the
// old listener lingers ("address in use").
func (p *Process) StartAgain(t testing.TB) {
	t.Helper()
	p.logs.Add("[harness] ---- start again ----")
	deadline := time.Now().Add(restartRetryFor)
	for {
		err := p.start()
		if err == nil {
			return
		}
		if time.Now().After(deadline) || !strings.Contains(err.Error(), "in use") {
			t.Fatalf("starting tailnetd again: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// stopTimeoutError is Stop's answer when the process had to be killed.
type stopTimeoutError struct{ after time.Duration }

func (e *stopTimeoutError) Error() string {
	return fmt.Sprintf("did not exit within %v of SIGTERM; killed", e.after)
}

func (p *Process) running() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cmd != nil
}

// start runs one process and waits for its announcement. On failure nothing is left running.
func (p *Process) start() error {
	cmd := exec.Command(p.bin, p.opts.Args...)
	// No readiness-off pause before a drain and no relay probing (its extra DERP
	// connections would show in the relay counts tests check); a test's flags still win.
	cmd.Env = append(os.Environ(), "NO_COLOR=1", "RUST_BACKTRACE=1",
		"TAILNETD_DRAIN_PAUSE=0s", "TAILNETD_DERP_MAP_HEALTH_INTERVAL=0s")
	if p.logFilter != "" {
		cmd.Env = append(cmd.Env, "TAILNETD_LOG="+p.logFilter)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return err
	}
	if err := startOnSpawnerThread(cmd); err != nil {
		return fmt.Errorf("start %s: %w", p.bin, err)
	}
	exited := make(chan struct{})
	var pipes sync.WaitGroup
	pipes.Add(2)
	go func() {
		defer pipes.Done()
		scanLines(stderr, p.logs.Add)
	}()
	announced := make(chan string, 1)
	go func() {
		defer pipes.Done()
		first := true
		scanLines(stdout, func(line string) {
			if first {
				first = false
				announced <- line
				return
			}
			p.logs.Add("[stdout, after the announcement] " + line)
		})
		if first {
			close(announced)
		}
	}()
	go func() {
		pipes.Wait()
		err := cmd.Wait()
		p.mu.Lock()
		p.exitErr = err
		p.mu.Unlock()
		close(exited)
	}()
	fail := func(err error) error {
		_ = cmd.Process.Kill()
		<-exited
		return err
	}

	var line string
	select {
	case l, ok := <-announced:
		if !ok {
			<-exited
			p.mu.Lock()
			exitErr := p.exitErr
			p.mu.Unlock()
			lines, _ := p.logs.Tail(LogTailLines)
			return fmt.Errorf("tailnetd exited before announcing (%v); log tail:\n%s", exitErr, strings.Join(lines, "\n"))
		}
		line = l
	case <-time.After(p.opts.StartTimeout):
		return fail(fmt.Errorf("no announcement within %v", p.opts.StartTimeout))
	}
	info, err := ParseAnnouncement(line)
	if err != nil {
		return fail(err)
	}
	if err := info.Require(p.opts.Require...); err != nil {
		return fail(fmt.Errorf("%w (line %q)", err, line))
	}
	p.mu.Lock()
	p.cmd, p.exited, p.info, p.infoLine = cmd, exited, info, line
	p.mu.Unlock()
	p.logs.Add("[harness] announcement: " + line)
	return nil
}

// scanLines calls add for every line read from r (lines up to 1 MiB).
func scanLines(r io.Reader, add func(string)) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		add(sc.Text())
	}
}

// DumpLogsOnFailure prints the case name and tailnetd's log tail if t (typically a subtest of the
// test that started p) fails; with TAILNETD_TEST_DUMP_LOGS=1, the whole log, always. The test
// that started p then only points at it instead of printing the same tail again.
func DumpLogsOnFailure(t *testing.T, p *Process) { dumpLogs(t, p, false) }

func dumpAll() bool { return os.Getenv("TAILNETD_TEST_DUMP_LOGS") != "" }

func dumpLogs(t *testing.T, p *Process, owner bool) {
	t.Cleanup(func() {
		all := dumpAll()
		if !t.Failed() && !all {
			return
		}
		p.mu.Lock()
		already := p.dumps
		p.dumps++
		p.mu.Unlock()
		if owner && already > 0 && !all {
			t.Logf("FAILED CASE %s: tailnetd's log tail was printed with the failing subtest(s) above", t.Name())
			return
		}
		n := LogTailLines
		if all {
			n = p.logs.Total()
		}
		lines, earlier := p.logs.Tail(n)
		verdict := "FAILED CASE"
		if !t.Failed() {
			verdict = "case (passed)"
		}
		t.Logf("%s %s: last %d tailnetd log lines, %d earlier (TAILNETD_LOG=%s %s):\n%s",
			verdict, t.Name(), len(lines), earlier, p.logFilter, p.CommandLine(), strings.Join(lines, "\n"))
	})
}

// The kernel's parent-death signal is tied to the OS thread that forked the child, so tailnetd
// is started from one goroutine locked to a thread that never exits: if the test binary dies
// without running its cleanups (a panic, a timeout), tailnetd gets SIGKILL instead of lingering.
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
