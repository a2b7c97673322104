//! Writing what `setup` decided: `relay.toml` edited in place with `toml_edit` (the user's
//! comments, order and layout stay; only the keys setup owns change), and the secret file,
//! created with mode 0600 and renamed into place so that no reader ever sees half of it.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use toml_edit::{ArrayOfTables, DocumentMut, Item, Key, Table, TableLike, Value};

use super::SetupError;

/// The annotated example shipped with the relay: a new `relay.toml` starts from it, so that
/// every key stays documented next to the values setup fills in.
pub const TEMPLATE: &str = include_str!("../../relay.toml");

/// `relay.toml` being edited.
pub struct ConfigDoc {
    doc: DocumentMut,
}

impl ConfigDoc {
    /// The file at `path`, or the shipped template when it does not exist.
    pub fn open(path: &Path) -> Result<(ConfigDoc, bool), SetupError> {
        match fs::read_to_string(path) {
            Ok(text) => Ok((ConfigDoc::parse(&text, path)?, true)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok((ConfigDoc::parse(TEMPLATE, Path::new("relay.toml"))?, false))
            }
            Err(e) => Err(SetupError::Io {
                what: format!("read {}", path.display()),
                source: e,
            }),
        }
    }

    pub fn parse(text: &str, path: &Path) -> Result<ConfigDoc, SetupError> {
        text.parse::<DocumentMut>()
            .map(|doc| ConfigDoc { doc })
            .map_err(|e| {
                // The position and the explanation, never the quoted line (it may hold a secret).
                let line = e
                    .span()
                    .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
                SetupError::Syntax {
                    file: path.to_path_buf(),
                    line,
                    message: e.message().to_string(),
                }
            })
    }

    /// A string value at `section.key`, if present.
    pub fn get_str(&self, section: &str, key: &str) -> Option<String> {
        self.doc
            .get(section)
            .and_then(Item::as_table_like)
            .and_then(|t| t.get(key))
            .and_then(Item::as_str)
            .map(str::to_string)
    }

    /// True when `section.key` is set (whatever its type).
    pub fn has(&self, section: &str, key: &str) -> bool {
        self.doc
            .get(section)
            .and_then(Item::as_table_like)
            .is_some_and(|t| t.contains_key(key))
    }

    /// Sets `section.key`, keeping the comment that follows an existing value on its line.
    pub fn set(&mut self, section: &str, key: &str, value: Value) {
        let table = self.section(section);
        let mut value = value;
        match table.get_mut(key) {
            // Replaced in place: the key (and the comment lines above it) stays.
            Some(item) => {
                if let Some(old) = item.as_value() {
                    *value.decor_mut() = old.decor().clone();
                }
                *item = Item::Value(value);
            }
            None => {
                let item = Item::Value(value);
                match self.doc.get_mut(section).and_then(Item::as_table_mut) {
                    Some(t) => insert_after_example(t, key, item),
                    None => {
                        self.section(section).insert(key, item);
                    }
                }
            }
        }
    }

    pub fn set_str(&mut self, section: &str, key: &str, value: &str) {
        self.set(section, key, Value::from(value));
    }

    pub fn remove(&mut self, section: &str, key: &str) {
        if let Some(t) = self.doc.get_mut(section).and_then(Item::as_table_like_mut) {
            t.remove(key);
        }
    }

    /// The table `[section]`, created at the end of the file when missing. This (with
    /// [`ConfigDoc::get_str`]) is the one place that knows where setup's keys live: the
    /// top-level `[upstream]` and `[oauth]`, the route named "default".
    fn section(&mut self, section: &str) -> &mut dyn TableLike {
        let root = self.doc.as_table_mut();
        if !root.get(section).is_some_and(Item::is_table_like) {
            root.insert(section, Item::Table(Table::new()));
        }
        root.get_mut(section)
            .and_then(Item::as_table_like_mut)
            .expect("inserted above")
    }

    /// The position of the `[[route]]` table named `name`.
    pub fn route_index(&self, name: &str) -> Option<usize> {
        self.doc
            .get("route")
            .and_then(Item::as_array_of_tables)?
            .iter()
            .position(|t| t.get("name").and_then(Item::as_str) == Some(name))
    }

    /// Puts a `[[route]]` table at `at` (replacing the one there, keeping the comment lines
    /// above it), or after the other routes. The other routes and the rest of the file stay.
    pub fn put_route(&mut self, mut table: Table, at: Option<usize>) {
        let root = self.doc.as_table_mut();
        if !root.get("route").is_some_and(Item::is_array_of_tables) {
            root.insert("route", Item::ArrayOfTables(ArrayOfTables::new()));
        }
        let Some(routes) = root.get_mut("route").and_then(Item::as_array_of_tables_mut) else {
            return;
        };
        match at.and_then(|i| routes.get_mut(i)) {
            Some(old) => {
                *table.decor_mut() = old.decor().clone();
                set_positions(&mut table, old.position().unwrap_or_default(), false);
                *old = table;
            }
            None => {
                // After every table of the file: one without a position would be written
                // after whichever table precedes it in key order, not at the end.
                set_positions(&mut table, last_position(self.doc.as_table()) + 1, true);
                // The comment lines at the end of the file (the annotated example's route
                // documentation) stay above the new route instead of ending up inside it.
                let trailing = self.doc.trailing().as_str().unwrap_or("").to_string();
                if !trailing.is_empty() {
                    let own = table
                        .decor()
                        .prefix()
                        .and_then(|p| p.as_str())
                        .unwrap_or("")
                        .to_string();
                    table.decor_mut().set_prefix(format!("{trailing}{own}"));
                    self.doc.set_trailing("");
                }
                if let Some(routes) = self
                    .doc
                    .get_mut("route")
                    .and_then(Item::as_array_of_tables_mut)
                {
                    routes.push(table);
                }
            }
        }
    }

    pub fn render(&self) -> String {
        self.doc.to_string()
    }
}

/// The largest position of any table in `table` (0 for none).
fn last_position(table: &Table) -> usize {
    let mut last = table.position().unwrap_or(0);
    for (_, item) in table.iter() {
        match item {
            Item::Table(t) => last = last.max(last_position(t)),
            Item::ArrayOfTables(a) => {
                for t in a.iter() {
                    last = last.max(last_position(t));
                }
            }
            _ => {}
        }
    }
    last
}

/// Positions `table` and its subtables from `first` on (`step`: one each; else all at `first`,
/// in the place of a table they replace).
fn set_positions(table: &mut Table, first: usize, step: bool) {
    table.set_position(first);
    let mut next = first;
    for (_, item) in table.iter_mut() {
        if let Item::Table(t) = item {
            if step {
                next += 1;
            }
            t.set_position(next);
        }
    }
}

/// Inserts `key` right below its commented example (`# key = ...`, as the annotated
/// relay.toml documents every key), else at the end of the table.
fn insert_after_example(table: &mut Table, key: &str, item: Item) {
    let keys: Vec<String> = table.iter().map(|(k, _)| k.to_string()).collect();
    for (i, k) in keys.iter().enumerate() {
        let prefix = table
            .key(k)
            .and_then(|k| k.leaf_decor().prefix())
            .and_then(|p| p.as_str())
            .unwrap_or("")
            .to_string();
        let Some(split) = example_line_end(&prefix, key) else {
            continue;
        };
        // Re-insert the keys from `k` on after the new one (a table keeps insertion order);
        // the comment lines up to the example go above the new key, the rest stay with `k`.
        let mut tail: Vec<(Key, Item)> = keys[i..]
            .iter()
            .filter_map(|k| table.remove_entry(k))
            .collect();
        let mut new_key = Key::new(key);
        new_key.leaf_decor_mut().set_prefix(&prefix[..split]);
        table.insert_formatted(&new_key, item);
        if let Some((first, _)) = tail.first_mut() {
            first.leaf_decor_mut().set_prefix(&prefix[split..]);
        }
        for (k, v) in tail {
            table.insert_formatted(&k, v);
        }
        return;
    }
    table.insert(key, item);
}

/// The byte offset just after the line `# key = ...` in a block of comment lines.
fn example_line_end(comments: &str, key: &str) -> Option<usize> {
    let mut offset = 0;
    for line in comments.split_inclusive('\n') {
        offset += line.len();
        let Some(rest) = line.trim_start().strip_prefix('#') else {
            continue;
        };
        if rest
            .trim_start()
            .strip_prefix(key)
            .is_some_and(|r| r.trim_start().starts_with('='))
        {
            return Some(offset);
        }
    }
    None
}

/// Writes `contents` to `path` atomically: a temporary file beside it (`mode`), fsync, rename
/// over `path`, fsync of the directory. A reader sees the old file or the new one.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), SetupError> {
    let io = |what: String| move |source| SetupError::Io { what, source };
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(".{name}.setup-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io(format!("create {}", tmp.display())))?;
        // The umask may have taken bits away; a secret file must be exactly 0600 either way.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io(format!("set the mode of {}", tmp.display())))?;
        file.write_all(contents)
            .map_err(io(format!("write {}", tmp.display())))?;
        file.sync_all()
            .map_err(io(format!("fsync {}", tmp.display())))?;
        fs::rename(&tmp, path).map_err(io(format!("rename into {}", path.display())))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io(format!("fsync {}", dir.display())))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The directory a file is in (`.` for a bare name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The mode to give a rewritten `relay.toml`: the old file's, else 0644 (it holds no secret).
pub fn config_mode(path: &Path) -> u32 {
    fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_keep_comments_and_inline_notes() {
        let text = "# top\n[oauth]\n# the tenant\ntenant_id = \"old\" # keep me\n\n[log]\nlevel = \"info\"\n";
        let mut doc = ConfigDoc::parse(text, Path::new("t.toml")).unwrap();
        doc.set_str("oauth", "tenant_id", "new.example");
        doc.set_str("upstream", "mail_account", "a@b.example");
        let out = doc.render();
        assert!(
            out.contains("# the tenant\ntenant_id = \"new.example\" # keep me"),
            "{out}"
        );
        assert!(out.starts_with("# top\n"), "{out}");
        assert!(
            out.contains("[upstream]\nmail_account = \"a@b.example\""),
            "{out}"
        );
    }

    #[test]
    fn new_keys_go_below_their_commented_example() {
        let mut doc = ConfigDoc::parse(TEMPLATE, Path::new("relay.toml")).unwrap();
        doc.set_str("upstream", "from", "alerts@contoso.com");
        doc.set_str("oauth", "client_secret_file", "/etc/x/client_secret");
        let out = doc.render();
        assert!(
            out.contains(
                "# from = \"noreply@contoso.com\"\nfrom = \"alerts@contoso.com\"\n# What to do"
            ),
            "{out}"
        );
        assert!(
            out.contains("# client_secret_file = \"/run/secrets/client_secret\"\nclient_secret_file = \"/etc/x/client_secret\"\n#  - a certificate"),
            "{out}"
        );
        assert!(out.contains("rewrite_from = \"when-different\""));
        // Every line of the template is still there.
        for line in TEMPLATE.lines() {
            assert!(out.contains(line), "lost: {line}");
        }
    }

    #[test]
    fn syntax_errors_name_the_line_not_its_text() {
        let e = ConfigDoc::parse(
            "[oauth]\nclient_secret = \"s3cr3t\" x\n",
            Path::new("r.toml"),
        )
        .err()
        .expect("invalid");
        let text = e.to_string();
        assert!(text.contains("line 2"), "{text}");
        assert!(!text.contains("s3cr3t"), "{text}");
    }
}
