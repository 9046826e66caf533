//! The DERP relay: server, client and STUN.
