//! Key types: text and binary forms, X25519 derivation and the NaCl box layout.
use proto::key::{BoxError, DiscoPublic, KeyParseError, MeshKey, NodePrivate, NodePublic};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn h32(s: &str) -> [u8; 32] {
    hex::decode(s).unwrap().try_into().unwrap()
}

// NaCl's own crypto_box test vector (tests/box.c in the NaCl distribution; also RFC 7748 6.1
// for the X25519 keys).
const ALICE_SK: &str = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a";
const ALICE_PK: &str = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a";
const BOB_SK: &str = "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb";
const BOB_PK: &str = "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f";
const NONCE: &str = "69696ee955b62b73cd62bda875fc73d68219e0036b7a0b37";
const MESSAGE: &str = "be075fc53c81f2d5cf141316ebeb0c7b5228c52a4c62cbd44b66849b64244ffc\
e5ecbaaf33bd751a1ac728d45e6c61296cdc3c01233561f41db66cce314adb31\
0e3be8250c46f06dceea3a7fa1348057e2f6556ad6b1318a024a838f21af1fde\
048977eb48f59ffd4924ca1c60902e52f0a089bc76897040e082f93776384864\
5e0705";
// Poly1305 tag first, then the ciphertext: the order of Go's box.Seal after the nonce.
const BOXED: &str = "f3ffc7703f9400e52a7dfb4b3d3305d9\
8e993b9f48681273c29650ba32fc76ce48332ea7164d96a4476fb8c531a1186a\
c0dfc17c98dce87b4da7f011ec48c97271d2c20f9b928fe2270d6fb863d51738\
b48eeee314a7cc8ab932164548e526ae90224368517acfeabd6bb3732bc0e9da\
99832b61ca01b6de56244a9e88d5f9b37973f622a43d14a6599b1f654cb45a74\
e355a5";

#[test]
fn x25519_public_keys_match_rfc7748() {
    assert_eq!(
        NodePrivate::from_bytes(h32(ALICE_SK)).public(),
        NodePublic::from_bytes(h32(ALICE_PK))
    );
    assert_eq!(
        NodePrivate::from_bytes(h32(BOB_SK)).public(),
        NodePublic::from_bytes(h32(BOB_PK))
    );
}

#[test]
fn seal_matches_nacl_vector_with_nonce_prefix() {
    let alice = NodePrivate::from_bytes(h32(ALICE_SK));
    let bob_pub = NodePublic::from_bytes(h32(BOB_PK));
    let nonce: [u8; 24] = hex::decode(NONCE).unwrap().try_into().unwrap();
    let sealed = alice.seal_to(&bob_pub, &hex::decode(MESSAGE).unwrap(), nonce);
    let mut want = nonce.to_vec();
    want.extend_from_slice(&hex::decode(BOXED).unwrap());
    assert_eq!(hex::encode(&sealed), hex::encode(&want));

    let bob = NodePrivate::from_bytes(h32(BOB_SK));
    let opened = bob.open_from(&alice.public(), &sealed).unwrap();
    assert_eq!(opened, hex::decode(MESSAGE).unwrap());
}

#[test]
fn seal_open_round_trip_and_rejections() {
    let mut rng = StdRng::seed_from_u64(7);
    let a = NodePrivate::generate(&mut rng);
    let b = NodePrivate::generate(&mut rng);
    let sealed = a.seal_to(&b.public(), b"hello", [9; 24]);
    assert_eq!(sealed.len(), 24 + 16 + 5);
    assert_eq!(&sealed[..24], &[9; 24]);
    assert_eq!(b.open_from(&a.public(), &sealed).unwrap(), b"hello");
    // Empty plaintext works too.
    let empty = a.seal_to(&b.public(), b"", [1; 24]);
    assert_eq!(b.open_from(&a.public(), &empty).unwrap(), b"");

    for i in 0..sealed.len() {
        let mut bad = sealed.clone();
        bad[i] ^= 0x01;
        assert_eq!(
            b.open_from(&a.public(), &bad),
            Err(BoxError::Open),
            "flip {i}"
        );
    }
    assert_eq!(
        b.open_from(&a.public(), &sealed[..39]),
        Err(BoxError::TooShort(39))
    );
    assert_eq!(
        b.open_from(&NodePublic::ZERO, &sealed),
        Err(BoxError::ZeroKey)
    );
    let c = NodePrivate::generate(&mut rng);
    assert_eq!(c.open_from(&a.public(), &sealed), Err(BoxError::Open));
}

#[test]
fn generate_is_clamped_and_deterministic_given_rng() {
    let k1 = NodePrivate::generate(&mut StdRng::seed_from_u64(1));
    let k2 = NodePrivate::generate(&mut StdRng::seed_from_u64(1));
    assert_eq!(k1, k2);
    let b = k1.to_bytes();
    assert_eq!(b[0] & 7, 0);
    assert_eq!(b[31] & 0xc0, 0x40);
    assert!(!k1.public().is_zero());
    assert!(format!("{k1:?}").contains("nodekey:"));
    assert!(!format!("{k1:?}").contains(&hex::encode(b)));
}

#[test]
fn node_public_text_form() {
    let k = NodePublic::from_bytes(h32(ALICE_PK));
    let s = k.to_string();
    assert_eq!(s, format!("nodekey:{ALICE_PK}"));
    assert_eq!(s.parse::<NodePublic>().unwrap(), k);
    // Go's hex decoder accepts upper case.
    assert_eq!(
        format!("nodekey:{}", ALICE_PK.to_uppercase())
            .parse::<NodePublic>()
            .unwrap(),
        k
    );
    assert_eq!(
        ALICE_PK.parse::<NodePublic>(),
        Err(KeyParseError::WrongPrefix {
            expected: "nodekey:"
        })
    );
    assert_eq!(
        format!("discokey:{ALICE_PK}").parse::<NodePublic>(),
        Err(KeyParseError::WrongPrefix {
            expected: "nodekey:"
        })
    );
    assert_eq!(
        format!("nodekey:{}", &ALICE_PK[..62]).parse::<NodePublic>(),
        Err(KeyParseError::WrongLength { got: 62, want: 64 })
    );
    assert_eq!(
        format!("nodekey:{ALICE_PK}00").parse::<NodePublic>(),
        Err(KeyParseError::WrongLength { got: 66, want: 64 })
    );
    assert_eq!(
        format!("nodekey:{}zz", &ALICE_PK[..62]).parse::<NodePublic>(),
        Err(KeyParseError::InvalidHex)
    );
    assert!(!KeyParseError::InvalidHex.to_string().is_empty());
    assert!(NodePublic::ZERO.is_zero());
    assert!(!k.is_zero());
    assert_eq!(k.short().to_string(), "[8520f009]");
}

#[test]
fn node_public_json_is_text_form() {
    let k = NodePublic::from_bytes(h32(ALICE_PK));
    let j = serde_json::to_string(&k).unwrap();
    assert_eq!(j, format!("\"nodekey:{ALICE_PK}\""));
    assert_eq!(serde_json::from_str::<NodePublic>(&j).unwrap(), k);
    assert!(serde_json::from_str::<NodePublic>("\"nodekey:00\"").is_err());
}

#[test]
fn node_public_np_binary_form() {
    let k = NodePublic::from_bytes(h32(ALICE_PK));
    let np = k.to_np_bytes();
    assert_eq!(&np[..2], b"np");
    assert_eq!(&np[2..], k.as_bytes());
    assert_eq!(NodePublic::from_np_bytes(&np).unwrap(), k);
    assert_eq!(
        NodePublic::from_np_bytes(&np[..33]),
        Err(KeyParseError::WrongLength { got: 33, want: 34 })
    );
    let mut bad = np;
    bad[0] = b'd';
    assert_eq!(
        NodePublic::from_np_bytes(&bad),
        Err(KeyParseError::WrongPrefix { expected: "np" })
    );
}

#[test]
fn private_and_disco_text_forms() {
    let sk = NodePrivate::from_bytes(h32(ALICE_SK));
    let s = sk.to_string();
    assert_eq!(s, format!("privkey:{ALICE_SK}"));
    assert_eq!(s.parse::<NodePrivate>().unwrap(), sk);
    assert!(format!("nodekey:{ALICE_SK}")
        .parse::<NodePrivate>()
        .is_err());
    let j = serde_json::to_string(&sk).unwrap();
    assert_eq!(serde_json::from_str::<NodePrivate>(&j).unwrap(), sk);

    let d = DiscoPublic::from_bytes(h32(BOB_PK));
    assert_eq!(d.to_string(), format!("discokey:{BOB_PK}"));
    assert_eq!(d.to_string().parse::<DiscoPublic>().unwrap(), d);
    assert!(format!("nodekey:{BOB_PK}").parse::<DiscoPublic>().is_err());
}

#[test]
fn mesh_key_parse_and_constant_time_eq() {
    let hexs = "6d529e9d4ef632d22d4a4214cb49da8f1ba1b72697061fb24e312984c35ec8d8";
    let m = MeshKey::parse(hexs).unwrap();
    assert_eq!(m.to_string(), hexs);
    assert_eq!(MeshKey::parse(&format!("  {hexs}\n")).unwrap(), m);
    assert_eq!(MeshKey::parse(&hexs.to_uppercase()).unwrap(), m);
    assert!(MeshKey::parse("abcdefg").is_err());
    assert!(MeshKey::parse(&format!("{hexs}ff")).is_err());
    assert_ne!(m, MeshKey::from_bytes([0; 32]));
    assert!(MeshKey::from_bytes([0; 32]).is_zero());
    assert!(!format!("{m:?}").contains(hexs));
}
