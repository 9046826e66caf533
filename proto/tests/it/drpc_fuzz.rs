//! The dRPC fuzz entry point must never panic: replay its seed corpus and random inputs.

use proptest::prelude::*;
use std::path::Path;

fn replay(dir: &str, f: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(dir);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus dir") {
        let data = std::fs::read(entry.expect("entry").path()).expect("read seed");
        f(&data);
        n += 1;
    }
    n
}

#[test]
fn drpc_seed_corpus() {
    assert!(replay("drpc", proto::fuzzing::drpc) >= 5);
}

proptest! {
    #[test]
    fn drpc_random_input(data in prop::collection::vec(any::<u8>(), 0..512)) {
        proto::fuzzing::drpc(&data);
    }

    #[test]
    fn drpc_random_frames(frames in prop::collection::vec(
        (0u8..=255, 0u64..4, 0u64..6, prop::collection::vec(any::<u8>(), 0..40)), 0..20),
        chunk in 1u8..=255,
    ) {
        // Well-formed frames with random kinds/ids/flags exercise the assembler's rules.
        let mut data = vec![chunk];
        for (cb, s, m, body) in frames {
            data.push(cb);
            let mut tmp = bytes::BytesMut::new();
            proto::drpc::put_varint(s, &mut tmp);
            proto::drpc::put_varint(m, &mut tmp);
            proto::drpc::put_varint(body.len() as u64, &mut tmp);
            data.extend_from_slice(&tmp);
            data.extend_from_slice(&body);
        }
        proto::fuzzing::drpc(&data);
    }
}
