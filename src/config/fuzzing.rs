//! Fuzz entry point for the TOML configuration: the bytes are a `--config` file, resolved for
//! every role exactly as `tailnetd <role> --config FILE` would (file parse, per-setting TOML
//! decoding, validation, the library configs' own checks), minus reading the file from disk.
//!
//! Shared by `fuzz/fuzz_targets/config_toml.rs` (through the `tailnetd` library target) and by
//! the corpus replay test below, which runs in `cargo test`. It must never panic: a bad file is an error naming the field, and whatever
//! resolves prints (`--check`) as TOML that parses again.

use super::{command, invocation, Settings, EVERY_ROLE};

/// Resolves `data` as the configuration file of each role.
pub fn config_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = text.parse::<toml::Table>() else {
        return;
    };
    for &role in EVERY_ROLE {
        let matches = command()
            .try_get_matches_from(["tailnetd", role.name()])
            .expect("a bare role is a valid command line");
        let inv = invocation(&matches).expect("a bare role is a valid invocation");
        let Ok(settings) = Settings::resolve_with_file(&inv, file.clone(), "fuzz".into()) else {
            continue;
        };
        let shown = settings.effective_toml();
        if let Err(e) = shown.parse::<toml::Table>() {
            panic!("--check output is not TOML ({e}):\n{shown}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Replays `fuzz/corpus/config_toml/` (seeds and what the fuzzer grew) through
    /// [`super::config_toml`], and checks that every corpus directory belongs to a target of
    /// `fuzz/Cargo.toml` and every target has a non-empty corpus (the libraries' replay tests
    /// run their own targets' corpora).
    #[test]
    fn replay_config_toml_corpus() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/config_toml");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("fuzz/corpus/config_toml") {
            let path = entry.expect("dir entry").path();
            let data = std::fs::read(&path).expect("corpus file");
            let res = std::panic::catch_unwind(|| super::config_toml(&data));
            assert!(res.is_ok(), "{} panicked", path.display());
            n += 1;
        }
        assert!(n > 0, "empty corpus");
    }

    #[test]
    fn fuzz_corpora_match_targets() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("fuzz/Cargo.toml");
        let manifest: toml::Table = manifest.parse().expect("fuzz/Cargo.toml is TOML");
        let mut targets: Vec<String> = manifest["bin"]
            .as_array()
            .expect("[[bin]] targets")
            .iter()
            .map(|b| b["name"].as_str().expect("bin name").to_string())
            .collect();
        targets.sort();
        let mut dirs: Vec<String> = std::fs::read_dir(root.join("corpus"))
            .expect("fuzz/corpus")
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.is_dir())
            .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
            .collect();
        dirs.sort();
        assert_eq!(
            dirs, targets,
            "fuzz/corpus/<target> directories vs fuzz/Cargo.toml targets"
        );
        for d in &dirs {
            let n = std::fs::read_dir(root.join("corpus").join(d))
                .expect("dir")
                .count();
            assert!(n > 0, "fuzz/corpus/{d} is empty");
        }
    }
}
