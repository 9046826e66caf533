//! The machine's ceiling for moving the relay workload's bytes: a plain TCP forwarder with no
//! framing. Each connection starts with an 8-byte hello (`b"FW"`, role 0 = sender / 1 = receiver,
//! 0, pair id as u32 big endian); once both ends of a pair are connected, every byte from the
//! sender is copied to its receiver (64 KiB buffer). One process, tokio, no parsing, no queues.
//!
//! With `--tls-cert`/`--tls-key` it terminates TLS first (rustls with ring, as tailnetd does) and
//! forwards the decrypted bytes over a second TLS session to the receiver: the ceiling for the
//! TLS relay cells, where every byte is decrypted once and encrypted once, as in a relay.
//!
//! Prints `{"http_addr":"127.0.0.1:N"}` on stdout once listening (the same shape as tailnetd's
//! start-up line; with TLS also `"https_addr"`, the same address), then serves until killed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use clap::Parser;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
#[command(name = "tcpfwd", about = "TCP forward ceiling for the relay benchmark")]
struct Cli {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// PEM certificate chain: terminate TLS on every connection (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

/// A connection, plain or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Default)]
struct Pending {
    senders: HashMap<u32, Box<dyn Io>>,
    receivers: HashMap<u32, Box<dyn Io>>,
}

async fn pump(from: Box<dyn Io>, mut to: Box<dyn Io>) {
    let mut rd = BufReader::with_capacity(64 << 10, from);
    let _ = tokio::io::copy_buf(&mut rd, &mut to).await;
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
