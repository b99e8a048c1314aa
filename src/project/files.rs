//! Reading a project's TOML files, and the checks recipe and inventory share: pinned
//! downloads and DNS labels.

use super::confine::{self, NamedBy};
use super::error::{RecipeError, Result};
use super::layout::Layout;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A file kiln downloads, pinned by sha256.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Pinned {
    pub url: String,
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// Reads a TOML file of the project: it must be a regular file inside the project (after
/// symlinks), at most [`confine::MAX_SMALL`] bytes.
fn read(layout: &Layout, path: &Path) -> Result<String> {
    let by = NamedBy {
        file: path,
        key: "(file)",
        fix: "create the file (see docs/guide/recipes.md) or run kiln from the project directory (--dir); a project's files must be inside it",
    };
    confine::read_text(layout, path, confine::MAX_SMALL, by)
}

/// Reads and parses a TOML file; a syntax or schema error names the line, column and fix.
pub(super) fn parse_toml<T: serde::de::DeserializeOwned>(
    layout: &Layout,
    path: &Path,
) -> Result<T> {
    let text = read(layout, path)?;
    toml::from_str(&text).map_err(|e| {
        let (line, col, snippet) = match e.span() {
            Some(span) => {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let col = span.start - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
                let snippet = text[span.start.min(text.len())..span.end.min(text.len())].trim().to_string();
                (line, col, snippet)
            }
            None => (0, 0, String::new()),
        };
        let msg = e.message().to_string();
        let key = if snippet.is_empty() || snippet.len() > 60 {
            format!("line {line}, column {col}")
        } else {
            format!("`{snippet}` (line {line}, column {col})")
        };
        let fix = if msg.contains("unknown field") {
            "remove or rename the key; the accepted keys are listed in the message and in docs/guide/recipes.md"
        } else if msg.contains("missing field") {
            "add the missing key (see docs/guide/recipes.md)"
        } else {
            "correct the TOML syntax or value type at that position (see docs/guide/recipes.md)"
        };
        RecipeError::new(path, key, msg, fix)
    })
}

pub(super) fn validate_pinned(path: &Path, key: &str, p: &Pinned) -> Result<()> {
    if !(p.url.starts_with("https://")
        || p.url.starts_with("http://")
        || p.url.starts_with("file://"))
    {
        return Err(RecipeError::new(
            path,
            format!("{key}.url"),
            format!("{:?} is not an http(s):// or file:// URL", p.url),
            "give the full download URL of the release asset",
        ));
    }
    if p.sha256.len() != 64
        || !p
            .sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(RecipeError::new(
            path,
            format!("{key}.sha256"),
            format!("{:?} is not a sha256 (64 lower-case hex digits)", p.sha256),
            "copy the digest from the release's sha256sum file",
        ));
    }
    Ok(())
}
