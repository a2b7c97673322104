//! sendmail's command line, as cron, PHP, mailx and the system tools pass it
//! (reference/next-capabilities.md §1.1, §1.2). Parsed by hand: getopt-style clusters
//! (`-FCronDaemon`, `-oi`, `-B8BITMIME`, `-f root` or `-froot`), options and recipients in any
//! order until `--`, and unknown flags accepted and ignored, as every other sendmail does.

use std::ffi::OsString;
use std::path::PathBuf;

/// What the invocation asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// `-bm` (the default): read a message from stdin and queue it.
    #[default]
    Deliver,
    /// `-bs`: SMTP on stdin/stdout (Symfony Mailer, SwiftMailer).
    Smtp,
    /// `-bp` or `mailq`: list the queue.
    ListQueue,
    /// `-bi` or `newaliases`: nothing to rebuild (aliases live in relay.toml).
    NewAliases,
    /// `-q`: the relay runs its queue by itself.
    RunQueue,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    pub mode: Mode,
    /// `-t`: recipients also from To, Cc and Bcc (Resent-* when present).
    pub extract_recipients: bool,
    /// `-i` / `-oi`: a line with a lone `.` is data, not the end of input.
    pub ignore_dots: bool,
    /// `-f` / `-r`: the envelope sender (`""` for `<>`).
    pub sender: Option<String>,
    /// `-F`: the full name for a From header sendmail adds.
    pub full_name: Option<String>,
    /// `-B 8BITMIME`.
    pub eight_bit: bool,
    /// `-v`: say what happened on stderr.
    pub verbose: bool,
    /// `-C file`: the relay configuration to read.
    pub config: Option<PathBuf>,
    pub recipients: Vec<String>,
}

/// Letters that take an argument (attached, or the next word).
const WITH_ARGUMENT: &[char] = &[
    'f', 'r', 'F', 'B', 'C', 'N', 'R', 'V', 'X', 'h', 'L', 'O', 'p', 'd', 'A',
];

/// Parses `args` (without the program name). `Err` is a usage error (exit 64).
pub fn parse(args: &[OsString]) -> Result<Options, String> {
    let mut o = Options::default();
    let mut words = args.iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(word) = words.next() {
        if word == "--" {
            o.recipients.extend(words.by_ref());
            break;
        }
        let Some(cluster) = word.strip_prefix('-').filter(|c| !c.is_empty()) else {
            o.recipients.push(word);
            continue;
        };
        let chars: Vec<char> = cluster.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            let rest: String = chars[i + 1..].iter().collect();
            match c {
                't' => o.extract_recipients = true,
                'i' => o.ignore_dots = true,
                'v' => o.verbose = true,
                // -o options are one word: -oi is the only one that matters; -oem, -odi,
                // -odb, -oX... are accepted and ignored.
                'o' => {
                    if rest == "i" {
                        o.ignore_dots = true;
                    }
                    break;
                }
                'b' => {
                    o.mode = match rest.as_str() {
                        "m" | "" => Mode::Deliver,
                        "s" => Mode::Smtp,
                        "p" => Mode::ListQueue,
                        "i" => Mode::NewAliases,
                        other => return Err(format!("-b{other}: mode not supported")),
                    };
                    break;
                }
                'q' => {
                    o.mode = Mode::RunQueue;
                    break;
                }
                c if WITH_ARGUMENT.contains(&c) => {
                    let value = if rest.is_empty() {
                        words
                            .next()
                            .ok_or_else(|| format!("-{c} needs an argument"))?
                    } else {
                        rest
                    };
                    match c {
                        'f' | 'r' => {
                            let v = value.trim();
                            o.sender = Some(if v == "<>" { String::new() } else { v.into() });
                        }
                        'F' => o.full_name = Some(value),
                        'C' => o.config = Some(PathBuf::from(value)),
                        'B' => match value.to_ascii_uppercase().as_str() {
                            "8BITMIME" => o.eight_bit = true,
                            "7BIT" => o.eight_bit = false,
                            _ => return Err(format!("-B{value}: expected 7BIT or 8BITMIME")),
                        },
                        // -N (DSN notify), -R (DSN return), -V (envid), -X (log file), -h
                        // (hop count), -L, -O, -p, -d, -A: accepted and ignored.
                        _ => {}
                    }
                    break;
                }
                // Any other flag (-n, -m, -U, -G, -e...): accepted and ignored.
                _ => {}
            }
            i += 1;
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(line: &str) -> Options {
        let args: Vec<OsString> = line.split_whitespace().map(OsString::from).collect();
        parse(&args).unwrap()
    }

    #[test]
    fn real_callers() {
        // Debian cron.
        let o = p("-FCronDaemon -i -B8BITMIME -oem root");
        assert_eq!(o.full_name.as_deref(), Some("CronDaemon"));
        assert!(o.ignore_dots && o.eight_bit && !o.extract_recipients);
        assert_eq!(o.recipients, ["root"]);
        // cronie.
        let o = p("-FCronDaemon -i -odi -oem -oi -t -f alice");
        assert!(o.extract_recipients && o.ignore_dots);
        assert_eq!(o.sender.as_deref(), Some("alice"));
        assert!(o.recipients.is_empty());
        // PHP, unattended-upgrades, mdadm, Symfony.
        assert!(p("-t -i").extract_recipients);
        assert!(p("-oi -t").ignore_dots);
        assert_eq!(p("-bs").mode, Mode::Smtp);
        assert_eq!(p("-bp").mode, Mode::ListQueue);
        let o = p("-t -fbounce@example.com -- a@example.com -b@example.com");
        assert_eq!(o.sender.as_deref(), Some("bounce@example.com"));
        assert_eq!(o.recipients, ["a@example.com", "-b@example.com"]);
        assert_eq!(p("-f <> x").sender.as_deref(), Some(""));
        assert!(p("-ti").ignore_dots);
        assert!(p("-oX -odb -U -n x").recipients == ["x"]);
    }

    #[test]
    fn usage_errors() {
        let bad = |line: &str| {
            let args: Vec<OsString> = line.split_whitespace().map(OsString::from).collect();
            parse(&args).unwrap_err()
        };
        assert!(bad("-B9BIT x").contains("7BIT or 8BITMIME"));
        assert!(bad("-f").contains("needs an argument"));
        assert!(bad("-bd").contains("not supported"));
    }
}
