//! The v1_json fuzz entry point (v1 nodes + JSON DERP maps) must never panic: replay its seed
//! corpus and random inputs.

use proptest::prelude::*;
use std::path::Path;

#[test]
fn v1_json_seed_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/v1_json");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus dir") {
        let data = std::fs::read(entry.expect("entry").path()).expect("read seed");
        proto::fuzzing::v1_json(&data);
        n += 1;
    }
    assert!(n >= 5);
}

proptest! {
    #[test]
    fn v1_json_random_bytes(data in prop::collection::vec(any::<u8>(), 0..300)) {
        proto::fuzzing::v1_json(&data);
    }

    #[test]
    fn v1_json_random_json_like(s in r#"[\{\}\[\]":,0-9a-zA-Z_ .\-]{0,120}"#) {
        proto::fuzzing::v1_json(s.as_bytes());
    }
}
