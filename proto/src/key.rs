//! Curve25519 key types and the NaCl box used by the DERP handshake.
//!
//! Why this module exists: every DERP frame addresses peers by a 32-byte node public key, and
//! the handshake seals JSON with NaCl `crypto_box` (X25519 + HSalsa20 + XSalsa20-Poly1305) in
//! exactly the layout Tailscale's `key.NodePrivate.SealTo` produces:
//! `nonce(24) || poly1305 tag(16) || ciphertext`. The text forms (`nodekey:`, `privkey:`,
//! `discokey:` + 64 lowercase hex) and Coder's `"np" + 32 bytes` binary form are what other
//! implementations put on the wire and in files, so they must match byte for byte.
//!
//! What this module must never do: generate randomness itself (keys and nonces come from the
//! caller), open a box from an all-zero public key (Go panics there; we return an error), print a
//! private key in `Debug`, or compare mesh keys in variable time.

use core::fmt;
use core::str::FromStr;

use crypto_box::aead::generic_array::GenericArray;
use crypto_box::aead::rand_core::{CryptoRng, RngCore};
use crypto_box::aead::AeadInPlace;
use crypto_box::SalsaBox;
use subtle::ConstantTimeEq;

/// Length of every key in bytes.
pub const KEY_LEN: usize = 32;
/// Length of a NaCl box nonce.
pub const NONCE_LEN: usize = 24;
/// Length of the Poly1305 tag that follows the nonce in a sealed box.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed box adds to its plaintext: nonce + tag.
pub const BOX_OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// Text prefix of a node public key (`key.NodePublic`).
pub const NODE_PUBLIC_PREFIX: &str = "nodekey:";
/// Text prefix of a node private key (`key.NodePrivate`).
pub const NODE_PRIVATE_PREFIX: &str = "privkey:";
/// Text prefix of a disco public key (`key.DiscoPublic`).
pub const DISCO_PUBLIC_PREFIX: &str = "discokey:";
/// Prefix of the binary form of a node public key (`key.NodePublic.MarshalBinary`), used by
/// Coder's protobuf `Node.key`.
pub const NODE_PUBLIC_BINARY_PREFIX: &[u8; 2] = b"np";

/// Why a key could not be parsed from text or binary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyParseError {
    /// The text did not start with the expected prefix.
    #[error("key must start with {expected:?}")]
    WrongPrefix {
        /// The prefix that was expected.
        expected: &'static str,
    },
    /// The key part had the wrong number of characters or bytes.
    #[error("key has wrong length {got}, want {want}")]
    WrongLength {
        /// Length found.
        got: usize,
        /// Length expected.
        want: usize,
    },
    /// The key part was not hexadecimal.
    #[error("key is not valid hex")]
    InvalidHex,
}

/// Failure to open a NaCl box.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoxError {
    /// The peer's public key is all zeros (Go's `OpenFrom` would panic).
    #[error("peer public key is zero")]
    ZeroKey,
    /// Shorter than nonce + tag.
    #[error("sealed box too short: {0} bytes")]
    TooShort(usize),
    /// Authentication failed: wrong key, wrong nonce or tampered bytes.
    #[error("box authentication failed")]
    Open,
}

/// Parses `prefix` + 64 hex characters (either case, like Go's `hex.Decode`).
fn parse_prefixed_hex(s: &str, prefix: &'static str) -> Result<[u8; KEY_LEN], KeyParseError> {
    let rest = s
        .strip_prefix(prefix)
        .ok_or(KeyParseError::WrongPrefix { expected: prefix })?;
    parse_hex32(rest)
}

pub(crate) fn parse_hex32(s: &str) -> Result<[u8; KEY_LEN], KeyParseError> {
    if s.len() != KEY_LEN * 2 {
        return Err(KeyParseError::WrongLength {
            got: s.len(),
            want: KEY_LEN * 2,
        });
    }
    let mut out = [0u8; KEY_LEN];
    hex::decode_to_slice(s, &mut out).map_err(|_| KeyParseError::InvalidHex)?;
    Ok(out)
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; KEY_LEN * 2];
    for (i, b) in bytes.iter().take(KEY_LEN).enumerate() {
        buf[2 * i] = DIGITS[usize::from(b >> 4)];
        buf[2 * i + 1] = DIGITS[usize::from(b & 0x0f)];
    }
    let n = bytes.len().min(KEY_LEN) * 2;
    // Only ASCII hex digits were written.
    f.write_str(core::str::from_utf8(&buf[..n]).map_err(|_| fmt::Error)?)
}

macro_rules! text_serde {
    ($ty:ty) => {
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// A node's Curve25519 public key: the DERP address of a peer.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct NodePublic([u8; KEY_LEN]);

impl NodePublic {
    /// The all-zero key (never a valid peer).
    pub const ZERO: NodePublic = NodePublic([0; KEY_LEN]);

    /// Wraps raw key bytes.
    pub const fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        NodePublic(bytes)
    }

    /// Reads a key from exactly 32 bytes; `None` for any other length.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let arr: [u8; KEY_LEN] = bytes.try_into().ok()?;
        Some(NodePublic(arr))
    }

    /// The raw key bytes.
    pub const fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Whether this is the all-zero key.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; KEY_LEN]
    }

    /// Binary form used by Coder's protobuf `Node.key`: `"np"` followed by the 32 key bytes.
    pub fn to_np_bytes(&self) -> [u8; 2 + KEY_LEN] {
        let mut out = [0u8; 2 + KEY_LEN];
        out[..2].copy_from_slice(NODE_PUBLIC_BINARY_PREFIX);
        out[2..].copy_from_slice(&self.0);
        out
    }

    /// Parses the `"np"` + 32 bytes binary form.
    pub fn from_np_bytes(b: &[u8]) -> Result<Self, KeyParseError> {
        if b.len() != 2 + KEY_LEN {
            return Err(KeyParseError::WrongLength {
                got: b.len(),
                want: 2 + KEY_LEN,
            });
        }
        if &b[..2] != NODE_PUBLIC_BINARY_PREFIX {
            return Err(KeyParseError::WrongPrefix { expected: "np" });
        }
        let mut out = [0u8; KEY_LEN];
        out.copy_from_slice(&b[2..]);
        Ok(NodePublic(out))
    }

    /// Short form for log lines: the first 4 key bytes in hex, in brackets.
    pub fn short(&self) -> ShortKey<'_> {
        ShortKey(&self.0)
    }
}

/// Log-friendly short rendering of a key (first 4 bytes in hex); see [`NodePublic::short`].
#[derive(Clone, Copy)]
pub struct ShortKey<'a>(&'a [u8; KEY_LEN]);

impl fmt::Display for ShortKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        write_hex(f, &self.0[..4])?;
        f.write_str("]")
    }
}

impl fmt::Debug for ShortKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl From<[u8; KEY_LEN]> for NodePublic {
    fn from(b: [u8; KEY_LEN]) -> Self {
        NodePublic(b)
    }
}

impl fmt::Display for NodePublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(NODE_PUBLIC_PREFIX)?;
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for NodePublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for NodePublic {
    type Err = KeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_prefixed_hex(s, NODE_PUBLIC_PREFIX).map(NodePublic)
    }
}

text_serde!(NodePublic);

/// A disco (path discovery) public key. Only carried, never used for crypto here.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct DiscoPublic([u8; KEY_LEN]);

impl DiscoPublic {
    /// Wraps raw key bytes.
    pub const fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        DiscoPublic(bytes)
    }

    /// Reads a key from exactly 32 bytes; `None` for any other length.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let arr: [u8; KEY_LEN] = bytes.try_into().ok()?;
        Some(DiscoPublic(arr))
    }

    /// The raw key bytes.
    pub const fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Whether this is the all-zero key.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; KEY_LEN]
    }
}

impl fmt::Display for DiscoPublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(DISCO_PUBLIC_PREFIX)?;
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for DiscoPublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for DiscoPublic {
    type Err = KeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_prefixed_hex(s, DISCO_PUBLIC_PREFIX).map(DiscoPublic)
    }
}

text_serde!(DiscoPublic);

/// A node's Curve25519 private key. `Debug` never shows the secret.
#[derive(Clone)]
pub struct NodePrivate {
    secret: crypto_box::SecretKey,
    public: NodePublic,
}

impl NodePrivate {
    /// Generates a new key from the caller's CSPRNG, clamped like Go's `key.NewNode`.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let mut b = [0u8; KEY_LEN];
        rng.fill_bytes(&mut b);
        b[0] &= 248;
        b[31] = (b[31] & 127) | 64;
        Self::from_bytes(b)
    }

    /// Wraps raw private key bytes (X25519 clamps them when used, as Go does).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        let secret = crypto_box::SecretKey::from_bytes(bytes);
        let public = NodePublic(*secret.public_key().as_bytes());
        NodePrivate { secret, public }
    }

    /// The raw private key bytes. Secret: handle with care.
    pub fn to_bytes(&self) -> [u8; KEY_LEN] {
        self.secret.to_bytes()
    }

    /// The matching public key (computed once at construction).
    pub fn public(&self) -> NodePublic {
        self.public
    }

    /// Whether the private key bytes are all zero.
    pub fn is_zero(&self) -> bool {
        self.secret.to_bytes() == [0; KEY_LEN]
    }

    fn salsa_box(&self, peer: &NodePublic) -> SalsaBox {
        SalsaBox::new(&crypto_box::PublicKey::from_bytes(peer.0), &self.secret)
    }

    /// Seals `plaintext` to `peer` with `nonce`, producing `nonce || tag || ciphertext`
    /// (Go's `NodePrivate.SealTo`). The nonce must be fresh random bytes from the caller.
    pub fn seal_to(&self, peer: &NodePublic, plaintext: &[u8], nonce: [u8; NONCE_LEN]) -> Vec<u8> {
        let mut out = Vec::with_capacity(BOX_OVERHEAD + plaintext.len());
        self.seal_to_into(peer, plaintext, nonce, &mut out);
        out
    }

    /// Like [`seal_to`](Self::seal_to) but appends to `out`.
    pub fn seal_to_into(
        &self,
        peer: &NodePublic,
        plaintext: &[u8],
        nonce: [u8; NONCE_LEN],
        out: &mut Vec<u8>,
    ) {
        let start = out.len();
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&[0u8; TAG_LEN]);
        out.extend_from_slice(plaintext);
        let body_at = start + BOX_OVERHEAD;
        let result = self.salsa_box(peer).encrypt_in_place_detached(
            GenericArray::from_slice(&nonce),
            b"",
            &mut out[body_at..],
        );
        match result {
            Ok(tag) => out[start + NONCE_LEN..body_at].copy_from_slice(&tag),
            // Only fails for non-empty associated data, which we never pass. Keep the output
            // unusable rather than panicking if that ever changes.
            Err(_) => out.truncate(start),
        }
    }

    /// Opens a box sealed by `peer` (`nonce || tag || ciphertext`), returning the plaintext.
    pub fn open_from(&self, peer: &NodePublic, sealed: &[u8]) -> Result<Vec<u8>, BoxError> {
        if peer.is_zero() {
            return Err(BoxError::ZeroKey);
        }
        if sealed.len() < BOX_OVERHEAD {
            return Err(BoxError::TooShort(sealed.len()));
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let (tag, ct) = rest.split_at(TAG_LEN);
        let mut buf = ct.to_vec();
        self.salsa_box(peer)
            .decrypt_in_place_detached(
                GenericArray::from_slice(nonce),
                b"",
                &mut buf,
                GenericArray::from_slice(tag),
            )
            .map_err(|_| BoxError::Open)?;
        Ok(buf)
    }
}

impl PartialEq for NodePrivate {
    fn eq(&self, other: &Self) -> bool {
        self.secret
            .to_bytes()
            .ct_eq(&other.secret.to_bytes())
            .into()
    }
}

impl Eq for NodePrivate {}

impl fmt::Debug for NodePrivate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodePrivate(public={})", self.public)
    }
}

impl fmt::Display for NodePrivate {
    /// The `privkey:<hex>` text form (secret!).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(NODE_PRIVATE_PREFIX)?;
        write_hex(f, &self.secret.to_bytes())
    }
}

impl FromStr for NodePrivate {
    type Err = KeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_prefixed_hex(s, NODE_PRIVATE_PREFIX).map(NodePrivate::from_bytes)
    }
}

text_serde!(NodePrivate);

/// The shared secret that DERP servers of one region (and privileged clients) present in
/// `ClientInfo.meshKey`. Text form: 64 hex digits, no prefix. Equality is constant time.
#[derive(Clone, Copy, Default)]
pub struct MeshKey([u8; KEY_LEN]);

impl MeshKey {
    /// Wraps raw bytes.
    pub const fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        MeshKey(bytes)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Whether all bytes are zero (Go treats that as "no mesh key").
    pub fn is_zero(&self) -> bool {
        self.0.ct_eq(&[0u8; KEY_LEN]).into()
    }

    /// Parses 64 hex digits, trimming surrounding whitespace like Go's `key.ParseDERPMesh`.
    pub fn parse(s: &str) -> Result<Self, KeyParseError> {
        parse_hex32(s.trim()).map(MeshKey)
    }
}

impl PartialEq for MeshKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for MeshKey {}

impl fmt::Debug for MeshKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MeshKey(<redacted>)")
    }
}

impl fmt::Display for MeshKey {
    /// The 64 lowercase hex digits (secret!).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl FromStr for MeshKey {
    type Err = KeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MeshKey::parse(s)
    }
}

text_serde!(MeshKey);
