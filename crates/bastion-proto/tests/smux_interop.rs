//! Interop: our sans-IO smux client (`bastion_proto::smux`) against the real Go
//! `github.com/xtaci/smux` v1.5.16 (Debian `golang-github-xtaci-smux-dev`, the version
//! the session-manager-plugin vendors), over a loopback TCP connection.
//!
//! The Go peer is `tests/interop/smux_echo/main.go` (ours). It is built with the Debian
//! Go toolchain in GOPATH mode, offline. Without `go` or the library these tests FAIL
//! and say which packages to install; they never skip.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use bastion_proto::smux::{CloseReason, Config, Event, Role, Session, StreamId, StreamRead};
use sha2::{Digest, Sha256};

const APT_HINT: &str = "the smux interop tests need the Go toolchain and the xtaci/smux \
library: run `apt-get install -y golang-go golang-github-xtaci-smux-dev`";

/// The Go library's GOPATH as installed by Debian.
const GOPATH: &str = "/usr/share/gocode";

/// Builds the Go echo server once per test process.
fn echo_binary() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BIN.get_or_init(build_echo) {
        Ok(p) => p.clone(),
        Err(e) => panic!("{e}"),
    }
}

fn build_echo() -> Result<PathBuf, String> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("smux_interop");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {dir:?}: {e}"))?;
    let out = dir.join("smux_echo");
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/smux_echo/main.go");
    let lib = PathBuf::from(GOPATH).join("src/github.com/xtaci/smux/session.go");
    if !lib.exists() {
        return Err(format!("{lib:?} is missing; {APT_HINT}"));
    }
    let result = Command::new("go")
        .arg("build")
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .env("GO111MODULE", "off")
        .env("GOPATH", GOPATH)
        .env("GOCACHE", dir.join("gocache"))
        .env("GOENV", "off")
        .env("GOFLAGS", "")
        .output();
    match result {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            Err(format!("`go` is not on PATH ({e}); {APT_HINT}"))
        }
        Err(e) => Err(format!("cannot run `go build`: {e}; {APT_HINT}")),
        Ok(o) if !o.status.success() => Err(format!(
            "`go build` of {src:?} failed ({}):\n{}\n{APT_HINT}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        )),
        Ok(_) => Ok(out),
    }
}

/// A running Go echo server; killed on drop.
struct Peer {
    child: Child,
    port: u16,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Peer {
    fn start(args: &[&str]) -> Peer {
        let mut child = Command::new(echo_binary())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn smux_echo");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = lines
            .recv_timeout(Duration::from_secs(10))
            .expect("smux_echo printed no port");
        let port = first
            .strip_prefix("port ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
        Peer {
            child,
            port,
            lines,
            seen: Vec::new(),
        }
    }

    /// Collects lines printed so far.
    fn poll_lines(&mut self) {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
    }

    /// Waits for a line starting with `prefix`.
    fn wait_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll_lines();
            if let Some(l) = self.seen.iter().find(|l| l.starts_with(prefix)) {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {prefix:?} line from smux_echo within {timeout:?}; got {:?}",
                self.seen
            );
            if let Ok(l) = self.lines.recv_timeout(left) {
                self.seen.push(l);
            }
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Blocking IO driver for one sans-IO client session over TCP. A reader thread moves
/// socket bytes into a channel so that writing never waits on our own reading.
struct Driver {
    sess: Session,
    sock: TcpStream,
    rx: Receiver<Option<Vec<u8>>>,
    /// The peer closed the TCP connection.
    eof: bool,
}

impl Driver {
    fn connect(port: u16, config: Config) -> Driver {
        let sock = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        sock.set_nodelay(true).expect("nodelay");
        let mut reader = sock.try_clone().expect("clone");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            loop {
                let mut buf = vec![0u8; 64 * 1024];
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(None);
                        break;
                    }
                    Ok(n) => {
                        buf.truncate(n);
                        if tx.send(Some(buf)).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let sess = Session::new(Role::Client, config, Instant::now()).expect("config");
        Driver {
            sess,
            sock,
            rx,
            eof: false,
        }
    }

    fn flush(&mut self) {
        while let Some(b) = self.sess.poll_transmit(256 * 1024) {
            if let Err(e) = self.sock.write_all(&b) {
                panic!("socket write failed: {e}");
            }
        }
    }

    fn input(&mut self, m: Option<Vec<u8>>) {
        match m {
            Some(b) => {
                if !self.sess.is_closed() {
                    self.sess.handle_input(&b).expect("Go sent invalid smux");
                }
            }
            None => self.eof = true,
        }
    }

    /// Runs timers, sends, then waits up to `wait` for input and returns the events.
    fn step(&mut self, wait: Duration) -> Vec<Event> {
        if let Some(t) = self.sess.poll_timeout()
            && Instant::now() >= t
        {
            self.sess.handle_timeout(Instant::now());
        }
        self.flush();
        let mut wait = wait;
        if let Some(t) = self.sess.poll_timeout() {
            wait = wait.min(t.saturating_duration_since(Instant::now()));
        }
        if !self.eof {
            match self.rx.recv_timeout(wait) {
                Ok(m) => {
                    self.input(m);
                    while let Ok(m) = self.rx.try_recv() {
                        self.input(m);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => self.eof = true,
            }
        } else {
            thread::sleep(wait);
        }
        if let Some(t) = self.sess.poll_timeout()
            && Instant::now() >= t
        {
            self.sess.handle_timeout(Instant::now());
        }
        std::iter::from_fn(|| self.sess.poll_event()).collect()
    }
}

/// Deterministic random bytes (xorshift64*).
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    v
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(PartialEq)]
enum Mode {
    /// Go echoes N bytes and sends FIN: tests Go FIN → our Eof.
    Counted,
    /// Go echoes until our FIN: tests our FIN → Go EOF.
    UntilEof,
}

struct EchoStream {
    id: StreamId,
    mode: Mode,
    /// 8-byte length header + payload.
    out: Vec<u8>,
    payload_len: usize,
    payload_sha: String,
    sent: usize,
    got: usize,
    hasher: Sha256,
    eof: bool,
    closed: bool,
}

impl EchoStream {
    fn new(sess: &mut Session, mode: Mode, len: usize, seed: u64) -> EchoStream {
        let id = sess.open_stream().expect("open_stream");
        let payload = random_bytes(len, seed);
        let header = match mode {
            Mode::Counted => len as u64,
            Mode::UntilEof => u64::MAX,
        };
        let mut out = header.to_le_bytes().to_vec();
        out.extend_from_slice(&payload);
        EchoStream {
            id,
            mode,
            payload_len: len,
            payload_sha: hex(&Sha256::digest(&payload)),
            out,
            sent: 0,
            got: 0,
            hasher: Sha256::new(),
            eof: false,
            closed: false,
        }
    }
}

/// Runs echo streams to completion; returns when every stream is closed on our side
/// and Go has reported every stream.
fn run_echo(d: &mut Driver, peer: &mut Peer, streams: &mut [EchoStream], limit: Duration) {
    let start = Instant::now();
    let mut piece = 1usize;
    loop {
        assert!(
            start.elapsed() < limit,
            "echo did not finish within {limit:?}: {:?}; Go said {:?}",
            streams
                .iter()
                .map(|s| (s.id, s.sent, s.got, s.eof, s.closed))
                .collect::<Vec<_>>(),
            peer.seen
        );
        // Keep at most ~1 MiB queued; vary write sizes to exercise frame splitting.
        let mut more = false;
        for s in streams.iter_mut() {
            while s.sent < s.out.len() && d.sess.pending_transmit() < 1024 * 1024 {
                piece = piece * 7 % 100_003 + 1;
                let n = piece.min(s.out.len() - s.sent);
                d.sess
                    .write(s.id, &s.out[s.sent..s.sent + n])
                    .expect("write");
                s.sent += n;
            }
            more |= s.sent < s.out.len();
        }
        let wait = if more {
            Duration::from_millis(1)
        } else {
            Duration::from_millis(20)
        };
        for ev in d.step(wait) {
            match ev {
                Event::Readable(id) | Event::Finished(id) => {
                    let s = streams
                        .iter_mut()
                        .find(|s| s.id == id)
                        .expect("event for our stream");
                    loop {
                        match d.sess.read(id, usize::MAX).expect("read") {
                            StreamRead::Data(b) => {
                                s.got += b.len();
                                s.hasher.update(&b);
                            }
                            StreamRead::Eof => {
                                s.eof = true;
                                break;
                            }
                            StreamRead::Blocked => break,
                        }
                    }
                }
                Event::Accepted(id) => panic!("the Go server opened stream {id}"),
                Event::Closed(r) => panic!("session closed: {r}"),
            }
        }
        assert!(!d.eof, "Go closed the connection; it said {:?}", peer.seen);
        for s in streams.iter_mut() {
            let answer_fin = s.mode == Mode::Counted && s.eof;
            let all_echoed =
                s.mode == Mode::UntilEof && s.sent == s.out.len() && s.got == s.payload_len;
            if !s.closed && (answer_fin || all_echoed) {
                d.sess.close(s.id).expect("close");
                s.closed = true;
            }
        }
        peer.poll_lines();
        let reported = streams
            .iter()
            .filter(|s| {
                peer.seen
                    .iter()
                    .any(|l| l.split(' ').nth(1) == Some(s.id.to_string().as_str()))
            })
            .count();
        if streams.iter().all(|s| s.closed) && reported == streams.len() {
            d.flush();
            return;
        }
    }
}

#[test]
fn many_streams_echo_through_go_smux() {
    let mut peer = Peer::start(&[]);
    let mut d = Driver::connect(peer.port, Config::keepalive_disabled());
    let start = Instant::now();

    const MIB: usize = 1024 * 1024;
    let mut streams: Vec<EchoStream> = (0..8)
        .map(|i| EchoStream::new(&mut d.sess, Mode::Counted, MIB + 4099 * i, 1000 + i as u64))
        .collect();
    streams.push(EchoStream::new(&mut d.sess, Mode::UntilEof, MIB, 7));
    streams.push(EchoStream::new(&mut d.sess, Mode::UntilEof, 333_333, 8));
    let ids: Vec<u32> = streams.iter().map(|s| s.id.0).collect();
    assert_eq!(ids, (0..10).map(|i| 3 + 2 * i).collect::<Vec<u32>>());

    run_echo(&mut d, &mut peer, &mut streams, Duration::from_secs(60));
    let elapsed = start.elapsed();

    let mut total = 0;
    for s in &mut streams {
        let ours = hex(&std::mem::take(&mut s.hasher).finalize());
        assert_eq!(s.got, s.payload_len, "stream {} length", s.id);
        assert_eq!(ours, s.payload_sha, "stream {} echoed bytes differ", s.id);
        let tag = match s.mode {
            Mode::Counted => "done",
            Mode::UntilEof => "eof",
        };
        let line = peer.wait_line(&format!("{tag} {} ", s.id), Duration::from_secs(5));
        assert_eq!(
            line,
            format!("{tag} {} {} {}", s.id, s.payload_len, s.payload_sha),
            "Go's view of stream {}",
            s.id
        );
        if s.mode == Mode::Counted {
            assert!(s.eof, "stream {}: Go's FIN did not become Eof", s.id);
        }
        total += s.payload_len;
    }
    assert!(
        !peer.seen.iter().any(|l| l.starts_with("error")),
        "{:?}",
        peer.seen
    );
    assert_eq!(d.sess.num_streams(), 0);
    let st = d.sess.stats();
    eprintln!(
        "smux interop: {} streams, {} MiB each way in {:.2?} ({:.1} MiB/s each way); \
         frames sent {}, received {}",
        streams.len(),
        total / MIB,
        elapsed,
        total as f64 / MIB as f64 / elapsed.as_secs_f64(),
        st.frames_sent,
        st.frames_received
    );
    let _ = d.sock.shutdown(Shutdown::Both);
}

#[test]
fn our_nops_satisfy_go_keepalive_and_go_nops_satisfy_ours() {
    // Go: NOP every 100 ms, closes after 300 ms without a frame.
    let mut peer = Peer::start(&["-keepalive", "100ms"]);
    let cfg = Config {
        send_keepalive: true,
        enforce_keepalive_timeout: true,
        keepalive_interval: Duration::from_millis(50),
        keepalive_timeout: Duration::from_millis(300),
        ..Config::default()
    };
    let mut d = Driver::connect(peer.port, cfg);
    let idle = Instant::now();
    while idle.elapsed() < Duration::from_millis(1500) {
        let evs = d.step(Duration::from_millis(10));
        assert!(evs.is_empty(), "unexpected events while idle: {evs:?}");
        if d.eof {
            peer.poll_lines();
            panic!(
                "Go closed an idle session despite our NOPs: {:?}",
                peer.seen
            );
        }
    }
    let st = d.sess.stats();
    assert!(st.nops_sent >= 20, "{st:?}");
    assert!(st.nops_received >= 10, "{st:?}");
    assert!(!d.sess.is_closed());

    // The session still carries data.
    let mut streams = vec![EchoStream::new(&mut d.sess, Mode::Counted, 100_000, 42)];
    run_echo(&mut d, &mut peer, &mut streams, Duration::from_secs(20));
    let s = &mut streams[0];
    assert_eq!(
        hex(&std::mem::take(&mut s.hasher).finalize()),
        s.payload_sha
    );
}

#[test]
fn go_keepalive_closes_a_silent_client() {
    let mut peer = Peer::start(&["-keepalive", "100ms"]);
    let mut d = Driver::connect(peer.port, Config::keepalive_disabled());
    let start = Instant::now();
    while !d.eof {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "Go did not close a silent session"
        );
        d.step(Duration::from_millis(20));
    }
    let elapsed = start.elapsed();
    // First timeout check is 300 ms after the session started.
    assert!(
        elapsed >= Duration::from_millis(250),
        "closed after {elapsed:?}"
    );
    assert!(d.sess.stats().nops_received >= 1);
    peer.wait_line("session-closed", Duration::from_secs(5));
}

#[test]
fn we_close_on_a_silent_go_peer() {
    let peer = Peer::start(&[]);
    let cfg = Config {
        send_keepalive: false,
        enforce_keepalive_timeout: true,
        keepalive_timeout: Duration::from_millis(200),
        ..Config::default()
    };
    let mut d = Driver::connect(peer.port, cfg);
    let start = Instant::now();
    loop {
        let evs = d.step(Duration::from_millis(20));
        if evs.contains(&Event::Closed(CloseReason::KeepaliveTimeout)) {
            break;
        }
        assert!(evs.is_empty(), "{evs:?}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no keepalive timeout"
        );
    }
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(190) && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );
}

#[test]
fn go_rejects_bad_version_and_unknown_command() {
    let mut peer = Peer::start(&[]);
    for bad in [[2u8, 0, 0, 0, 3, 0, 0, 0], [1u8, 7, 0, 0, 3, 0, 0, 0]] {
        peer.seen.clear();
        let mut sock = TcpStream::connect(("127.0.0.1", peer.port)).expect("connect");
        sock.write_all(&bad).expect("write");
        let line = peer.wait_line("session-closed", Duration::from_secs(5));
        assert_eq!(line, "session-closed invalid protocol", "for {bad:?}");
        // Go then closes the connection.
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 16];
        assert_eq!(sock.read(&mut buf).expect("read"), 0);
    }
}
