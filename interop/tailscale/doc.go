// Package tailscale holds black-box interoperability tests that drive the
// real Tailscale Go DERP and STUN client libraries against the tailnetd
// binary. It has no non-test code.
package tailscale
