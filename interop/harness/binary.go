package harness

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

var (
	binaryOnce sync.Once
	binaryPath string
	binaryErr  error
)

// Main is a suite's TestMain. It resolves the binary before m.Run, so that a slow cold cargo
// build does not count against `go test -timeout`, and makes the run's results uncacheable: they
// depend on the tailnetd binary, which go test's result cache cannot see (it only tracks files a
// test opens). Opening a file written a moment ago makes go test refuse to cache the run ("file
// too new"). A failure to get the binary fails every test that asks for it, with the reason.
func Main(m *testing.M) {
	Prepare()
	os.Exit(m.Run())
}

// Prepare does Main's work for a suite whose TestMain must do more around m.Run (start a
// database, say): it resolves the binary and makes the run's results uncacheable.
func Prepare() {
	binaryOnce.Do(func() { binaryPath, binaryErr = resolveBinary() })
	suite := "interop"
	if wd, err := os.Getwd(); err == nil {
		suite = filepath.Base(wd)
	}
	stamp := filepath.Join(os.TempDir(), "tailnetd-interop-"+suite+".stamp")
	if err := os.WriteFile(stamp, []byte(time.Now().String()), 0o600); err == nil {
		if f, err := os.Open(stamp); err == nil {
			_ = f.Close()
		}
	}
}

// Binary returns the absolute path of the binary under test: $TAILNETD_BIN, or tailnetd built
// once per test binary with cargo. It fails t if neither works.
func Binary(t testing.TB) string {
	t.Helper()
	binaryOnce.Do(func() { binaryPath, binaryErr = resolveBinary() })
	if binaryErr != nil {
		t.Fatalf("cannot get the tailnetd binary: %v", binaryErr)
	}
	return binaryPath
}

// RepoRoot finds the tailnetd repository root: two levels above this package's directory
// (interop/harness), falling back to two levels above the working directory that `go test` uses
// (a suite's package directory, interop/<suite>).
func RepoRoot() (string, error) {
	var candidates []string
	if _, file, _, ok := runtime.Caller(0); ok && filepath.IsAbs(file) {
		candidates = append(candidates, filepath.Join(filepath.Dir(file), "..", ".."))
	}
	if wd, err := os.Getwd(); err == nil {
		candidates = append(candidates, filepath.Join(wd, "..", ".."))
	}
	for _, c := range candidates {
		if _, err := os.Stat(filepath.Join(c, "Cargo.toml")); err == nil {
			return filepath.Clean(c), nil
		}
	}
	return "", fmt.Errorf("no Cargo.toml found in %v", candidates)
}

// resolveBinary returns $TAILNETD_BIN (made absolute, and checked to exist) or builds tailnetd
// with cargo at the repository root.
func resolveBinary() (string, error) {
	if bin := os.Getenv("TAILNETD_BIN"); bin != "" {
		abs, err := filepath.Abs(bin)
		if err != nil {
			return "", err
		}
		if _, err := os.Stat(abs); err != nil {
			return "", fmt.Errorf("TAILNETD_BIN: %w", err)
		}
		return abs, nil
	}
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	cmd := exec.Command("cargo", "build", "--quiet", "-p", "tailnetd")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("cargo build -p tailnetd in %s: %w\n%s", root, err, lastLines(string(out), 60))
	}
	targetDir := os.Getenv("CARGO_TARGET_DIR")
	if targetDir == "" {
		targetDir = filepath.Join(root, "target")
	} else if !filepath.IsAbs(targetDir) {
		targetDir = filepath.Join(root, targetDir)
	}
	bin := filepath.Join(targetDir, "debug", "tailnetd")
	if _, err := os.Stat(bin); err != nil {
		return "", fmt.Errorf("built tailnetd not found: %w", err)
	}
	return bin, nil
}

// lastLines returns the last n lines of s.
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
