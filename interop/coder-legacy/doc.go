// Package legacy drives a real tailnetd with Coder's v1 JSON coordination code (Coder v2.15.0,
// the last release that still ships it) and with that release's v2 stack for mixed sessions.
// Everything lives in the _test.go files; see README.md.
package legacy
