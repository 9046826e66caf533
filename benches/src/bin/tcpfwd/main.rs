//! The machine's ceiling for moving the relay workload's bytes: a plain TCP forwarder with no
//! framing. Each connection starts with an 8-byte hello (`b"FW"`, role 0 = sender / 1 = receiver,
//! 0, pair id as u32 big endian); once both ends of a pair are connected, every byte from the
//! sender is copied to its receiver. One process, tokio, no parsing.
//!
//! The copy has the relay's I/O shape without its work: a reader task reads the sender in chunks
//! of [`READ_CHUNK`] to [`READ_CHUNK_MAX`] bytes (tailnetd's read sizes) and hands each chunk to the
//! receiver's writer task through a bounded queue; the writer writes everything queued in one
//! vectored write. So the receiver gets the first bytes of a burst while the rest is still being
//! read, as from a relay. A single task that reads 64 KiB and then writes it (the first version,
//! `copy_buf`) turned a closed-loop burst into strict ping-pong and was beaten by tailnetd itself
//! whenever the load was latency-bound (one or ten pairs), so it was no ceiling.
//!
//! `--engine uring` runs the same copy on io_uring instead (module [`uring`]): fewer system calls
//! per packet, for the per-packet cells, where an epoll forwarder of the relay's shape only ties
//! with the relay.
//!
//! With `--tls-cert`/`--tls-key` it terminates TLS first (rustls with ring, as tailnetd does) and
//! forwards the decrypted bytes over a second TLS session to the receiver: the ceiling for the
//! TLS relay cells, where every byte is decrypted once and encrypted once, as in a relay.
//!
//! Prints `{"http_addr":"127.0.0.1:N"}` on stdout once listening (the same shape as tailnetd's
//! start-up line; with TLS also `"https_addr"`, the same address), then serves until killed.

use std::collections::HashMap;
use std::io::IoSlice;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

#[allow(unsafe_code)]
mod uring;

use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use clap::Parser;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// First read size: tailnetd's.
const READ_CHUNK: usize = 16 << 10;
/// Largest read: tailnetd's.
const READ_CHUNK_MAX: usize = 64 << 10;
/// Chunks queued between a pair's reader and writer (1 MiB at most): the reader waits when full.
const QUEUE_CHUNKS: usize = 64;
/// Chunks written by one vectored write.
const MAX_IOVECS: usize = 64;

#[derive(Debug, Parser)]
#[command(name = "tcpfwd", about = "TCP forward ceiling for the relay benchmark")]
struct Cli {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// How the bytes are moved: `tokio` (epoll, a reader and a writer task per pair) or `uring`
    /// (one io_uring thread for all pairs; plain TCP only).
    #[arg(long, value_enum, default_value_t = Engine::Tokio)]
    engine: Engine,
    /// PEM certificate chain: terminate TLS on every connection (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Engine {
    Tokio,
    Uring,
}

/// A connection, plain or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Default)]
struct Pending {
    senders: HashMap<u32, Box<dyn Io>>,
    receivers: HashMap<u32, Box<dyn Io>>,
}

/// Copies `from` to `to` until `from` ends: a reader task and this task as the writer.
async fn pump(from: Box<dyn Io>, to: Box<dyn Io>) {
    let (tx, rx) = mpsc::channel(QUEUE_CHUNKS);
    let reader = tokio::spawn(read_chunks(from, tx));
    write_chunks(rx, to).await;
    reader.abort();
}

/// Reads `from` and queues each chunk as soon as it is read, as tailnetd's reader does: reads
/// start at [`READ_CHUNK`] bytes and double, up to [`READ_CHUNK_MAX`], while they come back
/// full (a burst), halving again when they do not; after each read the task yields once so the
/// writer can send the chunk before the next read (tailnetd reads once per poll).
///
/// Space is reserved one largest read at a time, so that a chunk's memory is reused as soon as
/// the writer has sent it: reserving four (the first version) walked every pair's reads through
/// 256 KiB of memory, 25 MiB at 100 pairs, and the copy of each decrypted record into it missed
/// the cache (TLS, 100 pairs, 8000 B per packet: 7.8% of the forwarder's CPU in that copy and
/// 7.9% in freeing rustls's records, against 3.5% and 3.0% with one read reserved).
async fn read_chunks(mut from: Box<dyn Io>, tx: mpsc::Sender<Bytes>) {
    let mut buf = BytesMut::new();
    let mut want = READ_CHUNK;
    loop {
        if buf.capacity() < want {
            buf.reserve(READ_CHUNK_MAX);
        }
        let n = match (&mut from).take(want as u64).read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        want = if n == want {
            (want * 2).min(READ_CHUNK_MAX)
        } else if n < want / 2 {
            (want / 2).max(READ_CHUNK)
        } else {
            want
        };
        if tx.send(buf.split().freeze()).await.is_err() {
            return;
        }
        tokio::task::yield_now().await;
    }
}

/// Writes whatever is queued, up to [`MAX_IOVECS`] chunks per vectored write, and flushes when
/// the queue is empty, until the queue closes; then shuts the receiver's write side.
async fn write_chunks(mut rx: mpsc::Receiver<Bytes>, mut to: Box<dyn Io>) {
    let mut batch: Vec<Bytes> = Vec::with_capacity(MAX_IOVECS);
    while rx.recv_many(&mut batch, MAX_IOVECS).await > 0 {
        let mut at = 0;
        while at < batch.len() {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let n = slices.len().min(batch.len() - at);
            for (slice, chunk) in slices.iter_mut().zip(&batch[at..]) {
                *slice = IoSlice::new(chunk);
            }
            let mut written = match to.write_vectored(&slices[..n]).await {
                Ok(0) | Err(_) => return,
                Ok(w) => w,
            };
            while written > 0 {
                let first = &mut batch[at];
                if written >= first.len() {
                    written -= first.len();
                    at += 1;
                } else {
                    let _ = first.split_to(written);
                    written = 0;
                }
            }
        }
        batch.clear();
        if rx.is_empty() && to.flush().await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}

async fn handle(mut s: Box<dyn Io>, pending: Arc<Mutex<Pending>>) -> Result<()> {
    let mut hello = [0u8; 8];
    s.read_exact(&mut hello).await?;
    if &hello[..2] != b"FW" {
        anyhow::bail!("bad hello");
    }
    let receiver = hello[2] == 1;
    let pair = u32::from_be_bytes([hello[4], hello[5], hello[6], hello[7]]);
    let matched = {
        let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
        if receiver {
            match p.senders.remove(&pair) {
                Some(tx) => Some((tx, s)),
                None => {
                    p.receivers.insert(pair, s);
                    None
                }
            }
        } else {
            match p.receivers.remove(&pair) {
                Some(rx) => Some((s, rx)),
                None => {
                    p.senders.insert(pair, s);
                    None
                }
            }
        }
    };
    if let Some((tx, rx)) = matched {
        pump(tx, rx).await;
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if cli.engine == Engine::Uring {
        anyhow::ensure!(
            cli.tls_cert.is_none(),
            "--engine uring forwards plain TCP only"
        );
        let listener = std::net::TcpListener::bind(&cli.listen)
            .with_context(|| format!("binding {}", cli.listen))?;
        let addr = listener.local_addr()?;
        let forwarder = uring::Forwarder::new(listener)?;
        #[allow(clippy::print_stdout)]
        {
            println!("{{\"http_addr\":\"{addr}\"}}");
        }
        return forwarder.run();
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    let acceptor = match (&cli.tls_cert, &cli.tls_key) {
        (Some(cert), Some(key)) => {
            let tls =
                derp::edge::tls::TlsReloader::new(cert, key, None, &prometheus::Registry::new())
                    .context("loading --tls-cert/--tls-key")?;
            Some(tokio_rustls::TlsAcceptor::from(
                Arc::new(tls).server_config()?,
            ))
        }
        _ => None,
    };
    rt.block_on(async {
        let l = TcpListener::bind(&cli.listen).await?;
        let addr = l.local_addr()?;
        #[allow(clippy::print_stdout)]
        if acceptor.is_some() {
            println!("{{\"http_addr\":\"{addr}\",\"https_addr\":\"{addr}\"}}");
        } else {
            println!("{{\"http_addr\":\"{addr}\"}}");
        }
        let pending = Arc::new(Mutex::new(Pending::default()));
        loop {
            let (s, _) = l.accept().await?;
            s.set_nodelay(true)?;
            let p = pending.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let io: Box<dyn Io> = match acceptor {
                    Some(a) => match a.accept(s).await {
                        Ok(t) => Box::new(t),
                        Err(e) => {
                            eprintln!("tcpfwd: TLS: {e}");
                            return;
                        }
                    },
                    None => Box::new(s),
                };
                if let Err(e) = handle(io, p).await {
                    eprintln!("tcpfwd: {e}");
                }
            });
        }
    })
}
