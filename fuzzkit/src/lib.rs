//! What the fuzz entry points of `derp` and `coordinator` share (their `fuzzing` modules, built
//! for tests and under their `fuzzing` feature): a current-thread runtime on tokio's paused clock
//! that must finish within a deadline of virtual time, the peer that plays the fuzzer's bytes into
//! an in-memory duplex, and the replay of the committed corpora that runs in `cargo test`.
//!
//! Why a crate: `derp` and `coordinator` never depend on each other, and `proto` (where the pure
//! decoders' entry points live) must not use tokio or read files. Only tests and the fuzz crate
//! use this one.
//!
//! Must never: read a wall clock (the runtime's clock is paused, so keepalives and deadlines cost
//! no wall time and runs are deterministic) or let a hang pass (the deadline panics).

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How long the peer waits, once its input is sent, before ending it.
pub const SETTLE: Duration = Duration::from_secs(1);

/// Runs `fut` on a fresh current-thread runtime with a paused clock, panicking (naming `what`)
/// if it takes more than `deadline` of virtual time: a server side that outlives its peer's
/// input is a leak.
pub fn run_bounded<F: Future>(what: &str, deadline: Duration, fut: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("building a current-thread runtime");
    rt.block_on(async {
        match tokio::time::timeout(deadline, fut).await {
            Ok(v) => v,
            Err(_) => panic!("{what}: did not end within {deadline:?} after the peer's input"),
        }
    })
}

/// The peer's side: writes `input` in pieces of `chunk` bytes (at least 1), waits [`SETTLE`]
/// so the server can answer everything, then shuts its write half, while reading and
/// discarding everything the server sends until EOF or an error.
pub async fn play<IO>(io: IO, input: &[u8], chunk: usize)
where
    IO: AsyncRead + AsyncWrite,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let write = async {
        for piece in input.chunks(chunk.max(1)) {
            if wr.write_all(piece).await.is_err() {
                return;
            }
        }
        // Virtual time: this only passes once every task is idle.
        tokio::time::sleep(SETTLE).await;
        let _ = wr.shutdown().await;
    };
    let read = async {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::join!(write, read);
}

/// A fuzz target: its name (its corpus directory and `[[bin]]`) and its entry point.
pub type Target = (&'static str, fn(&[u8]));

/// Feeds every file of `fuzz/corpus/<name>/` (below `repo_root`) to its target, for each
/// `(name, target)`; panics naming the file that failed, or a corpus that is missing or empty.
pub fn replay_corpora(repo_root: &Path, targets: &[Target]) {
    let root = repo_root.join("fuzz").join("corpus");
    for (name, f) in targets {
        let dir = root.join(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("dir entry").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{} is empty", dir.display());
        for file in files {
            let data = std::fs::read(&file).expect("corpus file");
            let res = std::panic::catch_unwind(|| f(&data));
            assert!(res.is_ok(), "{name}: {} failed", file.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn play_delivers_the_input_in_chunks_and_ends_it() {
        let got = run_bounded("echo", Duration::from_secs(60), async {
            let (peer, mut server) = tokio::io::duplex(64);
            let serve = async move {
                let mut all = Vec::new();
                server.read_to_end(&mut all).await.unwrap();
                all
            };
            let (_, all) = tokio::join!(play(peer, b"hello, fuzzer", 3), serve);
            all
        });
        assert_eq!(got, b"hello, fuzzer");
    }

    #[test]
    #[should_panic(expected = "stuck: did not end within")]
    fn a_server_that_never_ends_fails_the_deadline() {
        run_bounded(
            "stuck",
            Duration::from_secs(5),
            std::future::pending::<()>(),
        );
    }
}
