//! The forwarder's io_uring engine (`--engine uring`): the same copy as the tokio engine, with
//! fewer system calls per packet, so that it stays a ceiling in the per-packet relay cells.
//!
//! Why it exists: measured apart (`benches/results/findings.md`, "Why `tcpfwd` is beaten"), a
//! forwarder with the relay's I/O shape (one `recv` and one vectored write per readiness, epoll)
//! ties with tailnetd when one frame is written per packet, because the kernel's loopback TCP work
//! is then most of both servers' CPU. A ceiling has to save kernel work the relay cannot: here one
//! thread owns one ring and every pair's receive and send are submitted and reaped in batches, one
//! `io_uring_enter` per round for all pairs, with no epoll and no readiness wake-ups
//! (`DEFER_TASKRUN`: completions run only when this thread asks for them).
//!
//! Per pair: a receive on the sender into one of [`BUFS`] buffers of [`BUF`] bytes while the
//! filled buffers are written to the receiver by one `writev` (up to all of them), so the receiver
//! gets the first bytes of a burst while the rest is still being read, as from a relay. Reading
//! waits when every buffer is full (a bounded queue per pair).
//!
//! Connections are accepted and their 8-byte hello read by a plain accepting thread (setup is not
//! measured); matched pairs reach the ring thread through a channel and a one-byte wake-up on a
//! Unix socket that the ring has a read posted on.
//!
//! Unsafe code is confined here: the kernel reads and writes the pairs' buffers and iovec arrays
//! between submission and completion, so a pair is freed only when none of its operations is in
//! flight, and its buffers are boxed (they do not move when the slab grows).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result};
use io_uring::{opcode, squeue, types, IoUring};

/// Size of one receive buffer. Not tailnetd's largest read (64 KiB): with 64 KiB receives the
/// engine fell, in about half the runs at one pair and 8000 B per packet, into a state that costs
/// 3.1–4.7 µs per packet instead of 2.4–2.9 (fewer, larger receives and sends, the thread never
/// sleeping, interrupt and softirq work on its core); with 32 KiB it stayed out of it in 12 runs
/// of 12 (`benches/results/findings.md`, "The forwarder's two mended cells").
const BUF: usize = 32 << 10;
/// Buffers per pair: at most `BUFS * BUF` bytes read and not yet written.
const BUFS: usize = 4;
/// Submission queue entries; completions get [`CQ_ENTRIES`] (a pair has at most two operations in
/// flight, and the kernel keeps overflowing completions rather than dropping them).
const SQ_ENTRIES: u32 = 1024;
const CQ_ENTRIES: u32 = 16384;
/// `user_data` of the wake-up read; pairs use `slot << 1 | op`.
const WAKE: u64 = u64::MAX;
const OP_RECV: u64 = 0;
const OP_SEND: u64 = 1;

/// One sender → receiver copy and its buffers.
struct Pair {
    from: TcpStream,
    to: TcpStream,
    /// Allocated on first use, never more than [`BUFS`].
    bufs: Vec<Box<[u8]>>,
    /// Indices of buffers holding nothing.
    free: Vec<usize>,
    /// Read and not yet written: (buffer, start, end), oldest first.
    filled: VecDeque<(usize, usize, usize)>,
    /// Buffer the posted receive fills.
    reading: Option<usize>,
    /// Chunks covered by the posted `writev` (0: none posted).
    writing: usize,
    /// The posted `writev`'s iovecs: the kernel reads them until it completes.
    iov: [libc::iovec; BUFS],
    /// The sender ended (or failed): no more receives.
    eof: bool,
    /// The receiver failed: nothing more is written.
    dead: bool,
    /// Operations submitted and not yet completed.
    inflight: u32,
}

impl Pair {
    fn new(from: TcpStream, to: TcpStream) -> Box<Self> {
        Box::new(Pair {
            from,
            to,
            bufs: Vec::with_capacity(BUFS),
            free: Vec::with_capacity(BUFS),
            filled: VecDeque::with_capacity(BUFS),
            reading: None,
            writing: 0,
            iov: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; BUFS],
            eof: false,
            dead: false,
            inflight: 0,
        })
    }

    /// A buffer to read into, allocating one while fewer than [`BUFS`] exist.
    fn take_buffer(&mut self) -> Option<usize> {
        if let Some(i) = self.free.pop() {
            return Some(i);
        }
        if self.bufs.len() < BUFS {
            self.bufs.push(vec![0u8; BUF].into_boxed_slice());
            return Some(self.bufs.len() - 1);
        }
        None
    }

    /// Drops `n` written bytes from the front of `filled`, freeing emptied buffers.
    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.filled.front_mut() else {
                return;
            };
            let len = front.2 - front.1;
            if n >= len {
                n -= len;
                let buf = front.0;
                self.filled.pop_front();
                self.free.push(buf);
            } else {
                front.1 += n;
                n = 0;
            }
        }
    }

    fn finished(&self) -> bool {
        self.inflight == 0 && (self.dead || (self.eof && self.filled.is_empty()))
    }
}

/// The ring thread's state: the ring, the pairs, and the wake-up socket.
struct Engine {
    ring: IoUring,
    pairs: Vec<Option<Box<Pair>>>,
    vacant: Vec<usize>,
    new_pairs: mpsc::Receiver<(TcpStream, TcpStream)>,
    wake: UnixStream,
    wake_buf: Box<[u8; 64]>,
}

impl Engine {
    /// Queues one submission, submitting what is queued first when the queue is full.
    fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every entry built by this engine points into a `Pair` (boxed, freed only when
            // its `inflight` is 0) or into `wake_buf` (owned by the engine for its whole life),
            // so the memory outlives the operation.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn post_wake_read(&mut self) -> io::Result<()> {
        let entry = opcode::Read::new(
            types::Fd(self.wake.as_raw_fd()),
            self.wake_buf.as_mut_ptr(),
            self.wake_buf.len() as u32,
        )
        .build()
        .user_data(WAKE);
        self.push(&entry)
    }

    fn add_pair(&mut self, from: TcpStream, to: TcpStream) -> io::Result<()> {
        let pair = Pair::new(from, to);
        let slot = match self.vacant.pop() {
            Some(slot) => {
                self.pairs[slot] = Some(pair);
                slot
            }
            None => {
                self.pairs.push(Some(pair));
                self.pairs.len() - 1
            }
        };
        self.post_recv(slot)
    }

    /// Posts a receive on the pair's sender if none is posted and a buffer is free.
    fn post_recv(&mut self, slot: usize) -> io::Result<()> {
        let Some(pair) = self.pairs[slot].as_mut() else {
            return Ok(());
        };
        if pair.reading.is_some() || pair.eof || pair.dead {
            return Ok(());
        }
        let Some(buf) = pair.take_buffer() else {
            return Ok(());
        };
        pair.reading = Some(buf);
        pair.inflight += 1;
        let entry = opcode::Recv::new(
            types::Fd(pair.from.as_raw_fd()),
            pair.bufs[buf].as_mut_ptr(),
            BUF as u32,
        )
        .build()
        .user_data((slot as u64) << 1 | OP_RECV);
        self.push(&entry)
    }

    /// Posts one `writev` of everything read and not yet written, if none is posted.
    fn post_send(&mut self, slot: usize) -> io::Result<()> {
        let Some(pair) = self.pairs[slot].as_mut() else {
            return Ok(());
        };
        if pair.writing > 0 || pair.filled.is_empty() || pair.dead {
            return Ok(());
        }
        let n = pair.filled.len().min(BUFS);
        for (iov, &(buf, start, end)) in pair.iov.iter_mut().zip(pair.filled.iter()) {
            iov.iov_base = pair.bufs[buf][start..].as_ptr() as *mut libc::c_void;
            iov.iov_len = end - start;
        }
        pair.writing = n;
        pair.inflight += 1;
        let entry =
            opcode::Writev::new(types::Fd(pair.to.as_raw_fd()), pair.iov.as_ptr(), n as u32)
                .build()
                .user_data((slot as u64) << 1 | OP_SEND);
        self.push(&entry)
    }

    fn on_recv(&mut self, slot: usize, res: i32) -> io::Result<()> {
        let Some(pair) = self.pairs[slot].as_mut() else {
            return Ok(());
        };
        pair.inflight -= 1;
        let buf = pair.reading.take();
        match (buf, usize::try_from(res)) {
            (Some(buf), Ok(n)) if n > 0 && !pair.dead => {
                pair.filled.push_back((buf, 0, n));
                self.post_send(slot)?;
                self.post_recv(slot)?;
            }
            (buf, _) => {
                // End of stream, an error, or the receiver is gone.
                if let Some(buf) = buf {
                    pair.free.push(buf);
                }
                pair.eof = true;
            }
        }
        self.settle(slot)
    }

    fn on_send(&mut self, slot: usize, res: i32) -> io::Result<()> {
        let Some(pair) = self.pairs[slot].as_mut() else {
            return Ok(());
        };
        pair.inflight -= 1;
        pair.writing = 0;
        match usize::try_from(res) {
            Ok(n) if n > 0 => {
                pair.advance(n);
                self.post_send(slot)?;
                self.post_recv(slot)?;
            }
            _ => {
                // The receiver failed: stop, and end the pending receive by shutting the sender.
                pair.dead = true;
                let _ = pair.from.shutdown(Shutdown::Both);
            }
        }
        self.settle(slot)
    }

    /// Ends the receiver's stream once everything is written, and frees the pair once nothing
    /// of it is in flight.
    fn settle(&mut self, slot: usize) -> io::Result<()> {
        let Some(pair) = self.pairs[slot].as_mut() else {
            return Ok(());
        };
        if pair.finished() {
            if !pair.dead {
                let _ = pair.to.shutdown(Shutdown::Write);
            }
            self.pairs[slot] = None;
            self.vacant.push(slot);
        }
        Ok(())
    }

    fn run(mut self) -> io::Result<()> {
        self.post_wake_read()?;
        let mut done: Vec<(u64, i32)> = Vec::with_capacity(CQ_ENTRIES as usize);
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                Err(e) => return Err(e),
            }
            done.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for (user_data, res) in done.drain(..) {
                if user_data == WAKE {
                    if res <= 0 {
                        // The accepting thread is gone: nothing new will come.
                        return Ok(());
                    }
                    while let Ok((from, to)) = self.new_pairs.try_recv() {
                        self.add_pair(from, to)?;
                    }
                    self.post_wake_read()?;
                    continue;
                }
                let slot = (user_data >> 1) as usize;
                if user_data & 1 == OP_RECV {
                    self.on_recv(slot, res)?;
                } else {
                    self.on_send(slot, res)?;
                }
            }
        }
    }
}

/// Accepts connections, reads each one's hello and hands every matched pair to the ring thread.
fn accept_pairs(
    listener: TcpListener,
    pairs: mpsc::Sender<(TcpStream, TcpStream)>,
    mut wake: UnixStream,
) -> Result<()> {
    let mut senders: HashMap<u32, TcpStream> = HashMap::new();
    let mut receivers: HashMap<u32, TcpStream> = HashMap::new();
    for conn in listener.incoming() {
        let mut conn = conn.context("accept")?;
        let hello = conn
            .set_nodelay(true)
            .and_then(|()| conn.set_read_timeout(Some(Duration::from_secs(10))))
            .and_then(|()| {
                let mut hello = [0u8; 8];
                conn.read_exact(&mut hello).map(|()| hello)
            })
            .and_then(|hello| conn.set_read_timeout(None).map(|()| hello));
        let hello = match hello {
            Ok(hello) if &hello[..2] == b"FW" => hello,
            Ok(_) => {
                eprintln!("tcpfwd: bad hello");
                continue;
            }
            Err(e) => {
                eprintln!("tcpfwd: {e}");
                continue;
            }
        };
        let pair_id = u32::from_be_bytes([hello[4], hello[5], hello[6], hello[7]]);
        let receiver = hello[2] == 1;
        let (mine, theirs) = if receiver {
            (&mut receivers, &mut senders)
        } else {
            (&mut senders, &mut receivers)
        };
        match theirs.remove(&pair_id) {
            Some(other) => {
                let pair = if receiver {
                    (other, conn)
                } else {
                    (conn, other)
                };
                pairs.send(pair).context("ring thread gone")?;
                wake.write_all(&[1]).context("waking the ring thread")?;
            }
            None => {
                mine.insert(pair_id, conn);
            }
        }
    }
    Ok(())
}

/// The forwarder, its ring created: [`Forwarder::run`] serves until the process is killed.
pub struct Forwarder {
    engine: Engine,
    listener: TcpListener,
    wake_tx: UnixStream,
    pairs_tx: mpsc::Sender<(TcpStream, TcpStream)>,
}

impl Forwarder {
    /// Creates the ring: fails at once (before anything is announced) when the kernel refuses
    /// io_uring.
    pub fn new(listener: TcpListener) -> Result<Forwarder> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_cqsize(CQ_ENTRIES)
            .build(SQ_ENTRIES)
            .context("creating the io_uring (is io_uring allowed on this kernel?)")?;
        let (wake_tx, wake_rx) = UnixStream::pair().context("wake-up socket")?;
        let (pairs_tx, pairs_rx) = mpsc::channel();
        Ok(Forwarder {
            engine: Engine {
                ring,
                pairs: Vec::new(),
                vacant: Vec::new(),
                new_pairs: pairs_rx,
                wake: wake_rx,
                wake_buf: Box::new([0u8; 64]),
            },
            listener,
            wake_tx,
            pairs_tx,
        })
    }

    /// Serves: the accepting thread, and the ring on this thread, which must be the one that
    /// created it (the ring is set up for a single issuer).
    pub fn run(self) -> Result<()> {
        let Forwarder {
            engine,
            listener,
            wake_tx,
            pairs_tx,
        } = self;
        let accepting = std::thread::Builder::new()
            .name("tcpfwd-accept".into())
            .spawn(move || accept_pairs(listener, pairs_tx, wake_tx))
            .context("accepting thread")?;
        engine.run().context("io_uring loop")?;
        match accepting.join() {
            Ok(result) => result,
            Err(_) => anyhow::bail!("the accepting thread panicked"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Starts the engine on a loopback port (its threads live as long as the test process).
    fn start() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        // The ring is created on the thread that submits to it (`SINGLE_ISSUER`).
        std::thread::spawn(move || Forwarder::new(listener).expect("io_uring").run());
        addr
    }

    fn connect(addr: std::net::SocketAddr, receiver: bool, pair: u32) -> TcpStream {
        let mut s = TcpStream::connect(addr).expect("connect");
        let mut hello = [b'F', b'W', u8::from(receiver), 0, 0, 0, 0, 0];
        hello[4..].copy_from_slice(&pair.to_be_bytes());
        s.write_all(&hello).expect("hello");
        s
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn copies_every_byte_in_order_and_ends_with_the_sender() {
        let addr = start();
        let mut receiver = connect(addr, true, 7);
        let mut sender = connect(addr, false, 7);
        let data = pattern(3 << 20);
        let to_send = data.clone();
        let writer = std::thread::spawn(move || {
            // Chunks of varying size, some larger than a receive buffer.
            let mut at = 0;
            let mut size = 1;
            while at < to_send.len() {
                let end = (at + size).min(to_send.len());
                sender.write_all(&to_send[at..end]).expect("write");
                at = end;
                size = size * 7 % 200_003 + 1;
            }
            sender.shutdown(Shutdown::Write).expect("shutdown");
        });
        let mut got = Vec::with_capacity(data.len());
        receiver
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        receiver.read_to_end(&mut got).expect("read to the end");
        writer.join().expect("writer");
        assert_eq!(got.len(), data.len());
        assert!(got == data, "bytes arrived changed or out of order");
    }

    #[test]
    fn a_failed_receiver_ends_only_its_pair() {
        let addr = start();
        let receiver_a = connect(addr, true, 1);
        let mut sender_a = connect(addr, false, 1);
        let mut receiver_b = connect(addr, true, 2);
        let mut sender_b = connect(addr, false, 2);
        drop(receiver_a);

        // Pair 1's sender sees its connection end once the forwarder finds the receiver gone.
        let started = Instant::now();
        let chunk = [0u8; 1024];
        let ended = loop {
            if sender_a.write_all(&chunk).is_err() {
                break true;
            }
            if started.elapsed() > Duration::from_secs(20) {
                break false;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        assert!(
            ended,
            "the sender of a pair whose receiver failed was never disconnected"
        );

        // Pair 2 is still served.
        sender_b.write_all(b"still here").expect("write");
        let mut got = [0u8; 10];
        receiver_b
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        receiver_b.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"still here");
    }
}
