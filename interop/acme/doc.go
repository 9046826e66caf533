// Package acme tests tailnetd's ACME certificates (derper's -certmode=letsencrypt) against
// Pebble, Let's Encrypt's test CA, built from the Go module proxy at the version go.mod pins
// (a tool of this module). Pebble really validates: its validation authority connects to the
// loopback ports its config names, where tailnetd's HTTP (HTTP-01) or HTTPS (TLS-ALPN-01)
// listener answers; only its random pre-validation sleep is off (PEBBLE_VA_NOSLEEP).
//
// Proven here: issuance with either challenge, the certificate stored in the cert dir in
// derper's layout and served chaining to Pebble's root (fetched from its management API),
// reuse from the cert dir after a restart without a new order, renewal once a third of the
// lifetime is left (Pebble's profile of a few seconds), and a CA outage leaving the relay
// serving the old certificate with a log line and derp_acme_renewals_total{result="failed"}.
package acme
