//! The interactive side of `setup`: questions on the terminal, each answer checked by its rule in
//! `config::identity` at once (a wrong value is explained and asked again), and the client
//! secret read with echo switched off.

use std::io::{BufRead, Write};
use std::os::fd::{AsRawFd, RawFd};

use super::SetupError;
use crate::config::identity::ValueProblem;

/// Wrong answers in a row before `setup` gives up on a question (exit 2).
const MAX_TRIES: usize = 10;

/// Questions on stderr, answers from stdin (a terminal).
pub struct Terminal {
    input: std::io::StdinLock<'static>,
    fd: RawFd,
}

impl Terminal {
    pub fn new() -> Terminal {
        let stdin = std::io::stdin();
        let fd = stdin.as_raw_fd();
        Terminal {
            input: stdin.lock(),
            fd,
        }
    }

    /// Prints text for the admin (explanations between questions).
    pub fn say(&mut self, text: &str) {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{text}");
        let _ = err.flush();
    }

    /// Asks until `rule` accepts the answer. Enter alone takes `default` (shown in brackets)
    /// when there is one; `optional` questions return `None` on Enter without a default.
    pub fn ask(
        &mut self,
        question: &Question<'_>,
        default: Option<&str>,
        rule: &dyn Fn(&str) -> Result<(), ValueProblem>,
    ) -> Result<Option<String>, SetupError> {
        for _ in 0..MAX_TRIES {
            self.prompt(question, default.map(|d| format!("[{d}]")).as_deref());
            let line = self.read_line(question)?;
            let answer = match (line.trim(), default) {
                ("", Some(d)) => d.to_string(),
                ("", None) if question.optional => return Ok(None),
                ("", None) => {
                    self.say("  an answer is required (Ctrl-D to stop)");
                    continue;
                }
                (a, _) => a.to_string(),
            };
            match rule(&answer) {
                Ok(()) => return Ok(Some(answer)),
                Err(p) => self.explain(&p),
            }
        }
        Err(SetupError::GaveUp(question.label.to_string()))
    }

    /// Asks for a secret with the terminal's echo off. Enter alone returns `None` when
    /// `keep` describes a credential already in place.
    pub fn ask_secret(
        &mut self,
        question: &Question<'_>,
        keep: Option<&str>,
        rule: &dyn Fn(&str) -> Result<(), ValueProblem>,
    ) -> Result<Option<String>, SetupError> {
        for _ in 0..MAX_TRIES {
            // Echo goes off before the prompt appears, so nothing typed after it is shown.
            let echo = EchoOff::new(self.fd);
            let hint = match (&echo, keep) {
                (Some(_), Some(k)) => format!("(not shown; Enter keeps {k})"),
                (Some(_), None) => "(not shown)".to_string(),
                (None, Some(k)) => format!("(WARNING: shown as typed; Enter keeps {k})"),
                (None, None) => "(WARNING: shown as typed)".to_string(),
            };
            self.prompt(question, Some(&hint));
            let line = self.read_line(question);
            drop(echo);
            let line = line?;
            let answer = line.trim_end_matches(['\r', '\n']);
            if answer.trim().is_empty() {
                if keep.is_some() {
                    return Ok(None);
                }
                self.say("  an answer is required (Ctrl-D to stop)");
                continue;
            }
            match rule(answer) {
                Ok(()) => return Ok(Some(answer.to_string())),
                Err(p) => self.explain(&p),
            }
        }
        Err(SetupError::GaveUp(question.label.to_string()))
    }

    fn prompt(&mut self, question: &Question<'_>, suffix: Option<&str>) {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err);
        let _ = writeln!(err, "{}", question.help);
        match suffix {
            Some(s) => {
                let _ = write!(err, "{} {s}: ", question.label);
            }
            None => {
                let _ = write!(err, "{}: ", question.label);
            }
        }
        let _ = err.flush();
    }

    /// One line; end of input (Ctrl-D) stops setup.
    fn read_line(&mut self, question: &Question<'_>) -> Result<String, SetupError> {
        let mut line = String::new();
        match self.input.read_line(&mut line) {
            Ok(0) => Err(SetupError::NoAnswer(question.label.to_string())),
            Ok(_) => Ok(line),
            Err(e) => Err(SetupError::Io {
                what: "read the answer from the terminal".into(),
                source: e,
            }),
        }
    }

    fn explain(&mut self, p: &ValueProblem) {
        self.say(&format!("  not accepted: {p}\n  fix: {}", p.fix));
    }
}

impl Default for Terminal {
    fn default() -> Self {
        Terminal::new()
    }
}

/// One question: what to type (`label`) and where the value is found (`help`).
pub struct Question<'a> {
    pub label: &'a str,
    pub help: &'a str,
    pub optional: bool,
}

/// The terminal's echo switched off (newlines still echoed) until dropped.
struct EchoOff {
    fd: RawFd,
    saved: libc::termios,
}

impl EchoOff {
    /// `None` when `fd` is no terminal (nothing to switch off).
    fn new(fd: RawFd) -> Option<EchoOff> {
        // SAFETY: termios is plain data; tcgetattr fills it or fails without touching memory
        // we do not own.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut quiet = saved;
        quiet.c_lflag &= !(libc::ECHO | libc::ECHOE | libc::ECHOK);
        quiet.c_lflag |= libc::ECHONL;
        // SAFETY: a termios obtained from tcgetattr for the same fd, with flags changed.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) } != 0 {
            return None;
        }
        Some(EchoOff { fd, saved })
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `new` on the same fd.
        unsafe {
            libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved);
        }
    }
}
