// Package coder holds interoperability tests that drive tailnetd with Coder's own Go tailnet
// libraries (github.com/coder/coder/v2/tailnet and friends), unchanged. Everything lives in
// _test.go files; see README.md.
package coder
