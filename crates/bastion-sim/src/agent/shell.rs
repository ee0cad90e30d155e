//! The Standard_Stream shell: [A] `agent/session/shell/shell.go` (fn
//! `executeCommandsWithPty`, `writePump`, `processStdoutData`) and `shell_unix.go` (fn
//! `StartCommandExecutor`, `InputStreamMessageHandler`, `SetSize`).
//!
//! `sh` runs in a pseudo-terminal as the session leader with the pty as its controlling
//! terminal (creack/pty `Start` does `Setsid` + `Setctty`; we use util-linux
//! `setsid --ctty`, since this crate forbids the `unsafe` a `pre_exec` hook needs).
//! The agent's RunAs user, shell profile, session logging and KMS are not modelled.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rustix::fs::{Mode, OFlags};
use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
use rustix::termios::{Winsize, tcsetwinsize};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::ExitReason;
use super::core::{Agent, Env, Plugin, RemoteData, TaskEvent};
use super::datachannel::{HandlerResult, STREAM_DATA_PAYLOAD_SIZE};
use bastion_proto::kind::PayloadType;
use bastion_proto::message::ClientMessage;
use bastion_proto::payload::{SizeData, from_json};

/// [A] `shell.go` fn `executeCommandsWithPty` → `setupRoutineToWriteCommandOutput(…, 1)`:
/// the write pump sleeps one second before its first read ("Wait for all input commands
/// to run").
const INITIAL_OUTPUT_WAIT: Duration = Duration::from_secs(1);
/// Beyond this many unwritten keystroke bytes a blocking pty write would block.
const PTY_WRITE_HIGH_WATER: usize = 64 * 1024;
/// The connection id used for the pty in [`RemoteData`] and [`TaskEvent`].
const PTY_CONN: u64 = 0;

/// A running shell.
pub(super) struct Shell {
    child: Child,
    master: Arc<OwnedFd>,
    writer: Option<mpsc::UnboundedSender<Bytes>>,
    queued: usize,
    output_start: Instant,
    /// [A] fn `processStdoutData` `unprocessedBuf`: an incomplete UTF-8 tail.
    unprocessed: Vec<u8>,
}

/// Opens a pty and starts `sh` on it.
fn spawn_shell(env: &Env) -> std::io::Result<Shell> {
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname(&master, Vec::new())?;
    let slave = rustix::fs::open(
        name.as_c_str(),
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mk = |prog: &str, args: &[&str]| -> std::io::Result<Command> {
        let mut c = Command::new(prog);
        c.args(args)
            .stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave.try_clone()?))
            // [A] `shell_unix.go`: TERM=xterm-256color, LANG=C.UTF-8 unless set.
            .env("TERM", "xterm-256color")
            .kill_on_drop(true);
        if std::env::var_os("LANG").is_none_or(|v| v.is_empty()) {
            c.env("LANG", "C.UTF-8");
        }
        Ok(c)
    };
    let child = match mk("setsid", &["--ctty", "/bin/sh"])?.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // No util-linux: a shell without a controlling terminal (no ^C signals).
            mk("/bin/sh", &["-i"])?.process_group(0).spawn()?
        }
        Err(e) => return Err(e),
    };
    drop(slave);
    let master = Arc::new(master);

    // Reader: blocking reads of ≤ 1024 bytes ([A] fn `writePump`), until EIO once the
    // shell and everything it started have closed the terminal.
    let mut rd = std::fs::File::from(master.try_clone()?);
    let data = env.data.clone();
    std::thread::Builder::new()
        .name("sim-agent-pty-read".into())
        .spawn(move || {
            let mut buf = vec![0u8; STREAM_DATA_PAYLOAD_SIZE];
            loop {
                match rd.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = data.blocking_send(RemoteData::Eof {
                            conn: PTY_CONN,
                            error: false,
                        });
                        return;
                    }
                    Ok(n) => {
                        let bytes = Bytes::copy_from_slice(&buf[..n]);
                        let d = RemoteData::Data {
                            conn: PTY_CONN,
                            bytes,
                        };
                        if data.blocking_send(d).is_err() {
                            return;
                        }
                    }
                }
            }
        })?;

    let mut wr = std::fs::File::from(master.try_clone()?);
    let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
    let events = env.events.clone();
    std::thread::Builder::new()
        .name("sim-agent-pty-write".into())
        .spawn(move || {
            while let Some(b) = rx.blocking_recv() {
                if let Err(e) = wr.write_all(&b) {
                    let _ = events.send(TaskEvent::WriterDone {
                        conn: PTY_CONN,
                        error: Some(e.to_string()),
                    });
                    return;
                }
                let _ = events.send(TaskEvent::Wrote {
                    conn: PTY_CONN,
                    n: b.len(),
                });
            }
        })?;

    Ok(Shell {
        child,
        master,
        writer: Some(tx),
        queued: 0,
        output_start: Instant::now() + INITIAL_OUTPUT_WAIT,
        unprocessed: Vec::new(),
    })
}

impl Shell {
    /// [A] `shell.go` `case <-cancelled`: kill the shell, close the pty.
    pub fn kill(&mut self) {
        self.writer = None;
        let _ = self.child.start_kill();
    }

    pub fn input_blocked(&self) -> bool {
        self.queued > PTY_WRITE_HIGH_WATER
    }

    pub fn output_start(&self) -> Option<Instant> {
        Some(self.output_start)
    }

    pub fn output_started(&self, now: Instant) -> bool {
        now >= self.output_start
    }

    pub fn on_wrote(&mut self, n: usize) {
        self.queued = self.queued.saturating_sub(n);
    }

    /// [A] `shell_unix.go` fn `InputStreamMessageHandler`: Output → stdin; Size → the pty
    /// window size (a JSON error fails the message: no ack); anything else is ignored.
    pub fn on_input(&mut self, _env: &mut Env, msg: &ClientMessage) -> HandlerResult {
        match msg.payload_type {
            PayloadType::Output => {
                let Some(w) = &self.writer else {
                    return HandlerResult::Failed("pty closed".into());
                };
                self.queued += msg.payload.len();
                let _ = w.send(msg.payload.clone());
                HandlerResult::Ok
            }
            PayloadType::Size => {
                let size: SizeData = match from_json("size", &msg.payload) {
                    Ok(s) => s,
                    Err(e) => return HandlerResult::Failed(format!("Invalid size message: {e}")),
                };
                // Go converts to uint16 by truncation (`uint16(ws_col)`).
                let ws = Winsize {
                    ws_row: size.rows as u16,
                    ws_col: size.cols as u16,
                    ws_xpixel: 0,
                    ws_ypixel: 0,
                };
                match tcsetwinsize(&*self.master, ws) {
                    Ok(()) => HandlerResult::Ok,
                    Err(e) => HandlerResult::Failed(format!("set pty size failed: {e}")),
                }
            }
            _ => HandlerResult::Ok,
        }
    }

    /// Output from the pty: returns the bytes to send (after [A] fn `processStdoutData`);
    /// EOF/EIO ends the session ([A] fn `writePump` returns SuccessExitCode).
    pub fn on_remote_data(&mut self, env: &mut Env, d: RemoteData) -> Option<Bytes> {
        match d {
            RemoteData::Data { bytes, .. } => {
                self.unprocessed.extend_from_slice(&bytes);
                let (out, rest) = process_stdout(&self.unprocessed);
                self.unprocessed = rest;
                (!out.is_empty()).then(|| Bytes::from(out))
            }
            RemoteData::Eof { .. } => {
                // A normal end of the session (the shell exited).
                env.request_end(ExitReason::TerminateFlag, "");
                None
            }
        }
    }
}

/// [A] `shell.go` fn `processStdoutData`: decode runes; a `RuneError` within the last
/// three bytes (an incomplete sequence, or anything invalid there) stays unprocessed for
/// the next read; an invalid byte earlier is passed through alone. Faithfully, a literal
/// U+FFFD (which Go's `ReadRune` also reports as `RuneError`, with size 3) outside the
/// tail is cut to its first byte, as the agent does.
fn process_stdout(buf: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut out = Vec::with_capacity(buf.len());
    let mut i = 0;
    while i < buf.len() {
        let (ch, len) = decode_rune(&buf[i..]);
        if ch == char::REPLACEMENT_CHARACTER {
            if buf.len() - i < 4 {
                break;
            }
            out.push(buf[i]);
        } else {
            out.extend_from_slice(&buf[i..i + len]);
        }
        i += len;
    }
    (out, buf[i..].to_vec())
}

/// Go `utf8.DecodeRune`: the rune and its size; `(RuneError, 1)` for invalid input.
fn decode_rune(b: &[u8]) -> (char, usize) {
    let n = match b.first() {
        Some(0x00..=0x7f) => 1,
        Some(0xc2..=0xdf) => 2,
        Some(0xe0..=0xef) => 3,
        Some(0xf0..=0xf4) => 4,
        _ => return (char::REPLACEMENT_CHARACTER, 1),
    };
    match b.get(..n).and_then(|s| std::str::from_utf8(s).ok()) {
        Some(s) => (s.chars().next().unwrap_or(char::REPLACEMENT_CHARACTER), n),
        None => (char::REPLACEMENT_CHARACTER, 1),
    }
}

impl Agent {
    /// [A] `shell_unix.go` fn `StartCommandExecutor` (failure: "Failed to start pty").
    pub(super) fn start_shell(&mut self, _now: Instant) {
        match spawn_shell(&self.env) {
            Ok(s) => self.plugin = Plugin::Shell(Box::new(s)),
            Err(e) => self.env.request_end(
                ExitReason::PluginFailed,
                format!("Failed to start pty: {e}"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdout_keeps_incomplete_utf8_tails() {
        let (o, r) = process_stdout("héllo".as_bytes());
        assert_eq!((o.as_slice(), r.as_slice()), ("héllo".as_bytes(), &b""[..]));
        // "é" cut in half at the end: held back.
        let (o, r) = process_stdout(b"ab\xc3");
        assert_eq!((o.as_slice(), r.as_slice()), (&b"ab"[..], &b"\xc3"[..]));
        // An invalid byte followed by more than 3 bytes passes through alone.
        let (o, r) = process_stdout(b"\xffabcd");
        assert_eq!((o.as_slice(), r.as_slice()), (&b"\xffabcd"[..], &b""[..]));
        // The agent's quirk: a literal U+FFFD not at the end keeps only its first byte.
        let (o, _) = process_stdout("\u{FFFD}abcd".as_bytes());
        assert_eq!(o.as_slice(), b"\xefabcd");
    }
}
