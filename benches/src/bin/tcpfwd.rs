//! The machine's ceiling for moving the relay workload's bytes: a plain TCP forwarder with no
//! framing. Each connection starts with an 8-byte hello (`b"FW"`, role 0 = sender / 1 = receiver,
//! 0, pair id as u32 big endian); once both ends of a pair are connected, every byte from the
//! sender is copied to its receiver (64 KiB buffer). One process, tokio, no parsing, no queues.
//!
//! Prints `{"http_addr":"127.0.0.1:N"}` on stdout once listening (the same shape as tailnetd's
//! start-up line), then serves until killed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Parser)]
#[command(name = "tcpfwd", about = "TCP forward ceiling for the relay benchmark")]
struct Cli {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
}

#[derive(Default)]
struct Pending {
    senders: HashMap<u32, TcpStream>,
    receivers: HashMap<u32, TcpStream>,
}

async fn pump(from: TcpStream, mut to: TcpStream) {
    let mut rd = BufReader::with_capacity(64 << 10, from);
    let _ = tokio::io::copy_buf(&mut rd, &mut to).await;
    let _ = to.shutdown().await;
}

async fn handle(mut s: TcpStream, pending: Arc<Mutex<Pending>>) -> Result<()> {
    s.set_nodelay(true)?;
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
    rt.block_on(async {
        let l = TcpListener::bind(&cli.listen).await?;
        #[allow(clippy::print_stdout)]
        {
            println!("{{\"http_addr\":\"{}\"}}", l.local_addr()?);
        }
        let pending = Arc::new(Mutex::new(Pending::default()));
        loop {
            let (s, _) = l.accept().await?;
            let p = pending.clone();
            tokio::spawn(async move {
                if let Err(e) = handle(s, p).await {
                    eprintln!("tcpfwd: {e}");
                }
            });
        }
    })
}
