//! Bounds on the YAML (and JSON, a subset) kiln parses from outside itself: manifests and
//! SealedSecrets a project names, `registries.yaml`, the Secret given to `kiln seal`, the
//! rendered cloud-init seed files. Every such parse goes through [`check_yaml`] first.
//!
//! The YAML parser kiln uses (libyaml under serde_yaml) reads the whole event stream before its
//! own recursion limit applies, and its cost grows with the nesting depth: 100 000 nested
//! `{a: ` take minutes to be refused. [`check_yaml`] is one linear pass over the bytes that
//! refuses an input over its size cap, or nested deeper than [`MAX_DEPTH`], before the parser
//! sees it.
//!
//! The depth scan is a small lexer of YAML's structure: flow collections (`[`, `{`) outside
//! quoted and plain scalars, comments and block scalars (`|`, `>`), and block collections by
//! indentation, including several on one line (`- - - x`, `? ? x`). It counts what the parser
//! would nest (a little more in odd corners: an indentless sequence counts as its mapping's
//! level, a flow key as the level of its mapping), so a document the parser takes within
//! serde_yaml's own limit of 128 passes unless it is deeper than [`MAX_DEPTH`].

/// Deepest nesting of collections kiln reads (serde_yaml itself stops at 128). Kubernetes
/// objects, CRDs with their OpenAPI schemas included, stay well below it.
pub const MAX_DEPTH: usize = 100;

/// What is read, and how large it may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct YamlInput {
    /// Named in the error, e.g. "a manifest".
    pub what: &'static str,
    /// Size cap in bytes.
    pub max_bytes: usize,
}

const MIB: usize = 1 << 20;

/// A Kubernetes manifest under recipes/ (CRD bundles run to a few MiB).
pub const MANIFEST: YamlInput = YamlInput {
    what: "a manifest",
    max_bytes: 16 * MIB,
};
/// A SealedSecret under recipes/ or given to `kiln unseal` (a Secret holds at most 1 MiB).
pub const SEALED_SECRET: YamlInput = YamlInput {
    what: "a SealedSecret",
    max_bytes: 4 * MIB,
};
/// The Secret given to `kiln seal` (the API server caps a Secret at 1 MiB).
pub const SECRET: YamlInput = YamlInput {
    what: "a Secret",
    max_bytes: 4 * MIB,
};
/// `[k3s] registries`.
pub const REGISTRIES: YamlInput = YamlInput {
    what: "registries.yaml",
    max_bytes: MIB,
};
/// One rendered cloud-init seed file (the seed partition holds 4 MiB in all).
pub const SEED_FILE: YamlInput = YamlInput {
    what: "a seed file",
    max_bytes: 4 * MIB,
};

/// Why an input was refused before parsing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum YamlLimitError {
    #[error("{len} bytes is more than the {max} bytes kiln reads for {what}")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("nested more than {max} levels deep (at line {line}); kiln refuses deeper YAML/JSON")]
    TooDeep { max: usize, line: usize },
}

/// Refuses `text` if it is larger than `input` allows or nested deeper than [`MAX_DEPTH`];
/// linear in the length of `text`.
pub fn check_yaml(text: &str, input: YamlInput) -> Result<(), YamlLimitError> {
    if text.len() > input.max_bytes {
        return Err(YamlLimitError::TooLarge {
            what: input.what,
            len: text.len(),
            max: input.max_bytes,
        });
    }
    match first_line_deeper_than(text, MAX_DEPTH) {
        Some(line) => Err(YamlLimitError::TooDeep {
            max: MAX_DEPTH,
            line,
        }),
        None => Ok(()),
    }
}

/// `c` ends an indicator (`- `, `? `, `: `): white space or the end of the line.
fn blank_or_end(b: &[u8], i: usize) -> bool {
    matches!(b.get(i), None | Some(b' ' | b'\t'))
}

/// The scanner's state carried from line to line.
#[derive(Default)]
struct Scan {
    /// Columns of the open block collections, innermost last.
    indents: Vec<usize>,
    /// Open flow collections.
    flow: usize,
    /// Per open flow collection, innermost last: whether it is a sequence whose current entry
    /// is an implicit single-pair mapping (`[a: b]`), a level of its own to the parser.
    pairs: Vec<(bool, bool)>,
    /// Block depth where the outermost open flow collection began.
    flow_base: usize,
    /// An open quoted scalar (`'` or `"`) continuing on the next line.
    quote: Option<u8>,
    /// In a block scalar: lines indented more than this (-1: any line) are its content.
    block_scalar: Option<isize>,
    /// The next token starts a node (in flow context, carried across lines).
    start: bool,
    /// Inside a plain scalar (in flow context, carried across lines).
    plain: bool,
}

impl Scan {
    /// A block collection at column `col`: a sibling of the innermost one or nested in it.
    fn open_block(&mut self, col: usize) {
        if self.indents.last().is_none_or(|&c| c < col) {
            self.indents.push(col);
        }
    }

    fn depth(&self) -> usize {
        if self.flow > 0 {
            self.flow_base + self.flow + self.pairs.iter().filter(|(_, p)| *p).count()
        } else {
            self.indents.len()
        }
    }
}

/// The 1-based line where nesting first exceeds `max`, if it does.
fn first_line_deeper_than(text: &str, max: usize) -> Option<usize> {
    let mut s = Scan::default();
    // libyaml skips a byte order mark at the start, and breaks lines at CR, LF, CR LF, NEL,
    // LS and PS: a "line" that hid one of them would hide what follows it.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines = text.split('\n').enumerate().flat_map(|(n, l)| {
        l.split(['\r', '\u{85}', '\u{2028}', '\u{2029}'])
            .map(move |part| (n, part))
    });
    for (n, line) in lines {
        let b = line.as_bytes();
        let indent = b.iter().take_while(|&&c| c == b' ').count();
        if let Some(parent) = s.block_scalar {
            let doc_marker = indent == 0 && (b.starts_with(b"---") || b.starts_with(b"..."));
            if !doc_marker && (indent == b.len() || indent as isize > parent) {
                continue;
            }
            s.block_scalar = None;
        }
        let mut pos = 0;
        if s.quote.is_none() && s.flow == 0 {
            let rest = &b[indent..];
            if rest.is_empty() || rest[0] == b'#' || (indent == 0 && rest[0] == b'%') {
                continue;
            }
            if indent == 0
                && (rest.starts_with(b"---") || rest.starts_with(b"..."))
                && blank_or_end(rest, 3)
            {
                s.indents.clear();
                pos = 3;
            } else {
                while s.indents.last().is_some_and(|&c| c > indent) {
                    s.indents.pop();
                }
                pos = indent;
                // Block indicators, several possibly on one line: `- - x`, `? - x`, `: x`.
                while matches!(b.get(pos), Some(b'-' | b'?' | b':')) && blank_or_end(b, pos + 1) {
                    s.open_block(pos);
                    if s.indents.len() > max {
                        return Some(n + 1);
                    }
                    pos += 1;
                    while matches!(b.get(pos), Some(b' ' | b'\t')) {
                        pos += 1;
                    }
                }
            }
            s.start = true;
            s.plain = false;
        }
        if scan_line(&mut s, b, pos, max) {
            return Some(n + 1);
        }
    }
    None
}

/// Scans one line from `pos` (the column its node starts at); true if nesting exceeds `max`.
fn scan_line(s: &mut Scan, b: &[u8], pos: usize, max: usize) -> bool {
    let node_col = pos;
    let mut key_seen = false;
    let mut j = pos;
    while j < b.len() {
        let c = b[j];
        if let Some(q) = s.quote {
            if q == b'"' && c == b'\\' {
                j += 2;
                continue;
            }
            if c == q {
                if q == b'\'' && b.get(j + 1) == Some(&b'\'') {
                    j += 2;
                    continue;
                }
                s.quote = None;
                s.start = false;
            }
            j += 1;
            continue;
        }
        let after_blank = j == 0 || matches!(b[j - 1], b' ' | b'\t');
        match c {
            b'#' if after_blank => break,
            b' ' | b'\t' => {}
            b':' if blank_or_end(b, j + 1)
                || (s.flow > 0
                    && matches!(b.get(j + 1), Some(b',' | b'[' | b']' | b'{' | b'}'))) =>
            {
                if s.flow == 0 && !key_seen {
                    key_seen = true;
                    s.open_block(node_col);
                    if s.depth() > max {
                        return true;
                    }
                }
                // A key in a flow sequence opens a single-pair mapping (found by the
                // yaml_limits fuzz target: `[a: [a: …` nests twice per bracket).
                if let Some((true, pair)) = s.pairs.last_mut() {
                    if !*pair {
                        *pair = true;
                        if s.depth() > max {
                            return true;
                        }
                    }
                }
                s.plain = false;
                s.start = true;
            }
            b',' if s.flow > 0 => {
                if let Some((_, pair)) = s.pairs.last_mut() {
                    *pair = false;
                }
                s.plain = false;
                s.start = true;
            }
            b']' | b'}' if s.flow > 0 => {
                s.flow -= 1;
                s.pairs.pop();
                s.plain = false;
                s.start = false;
            }
            b'[' | b'{' if s.start || s.flow > 0 => {
                if s.flow == 0 {
                    s.flow_base = s.indents.len();
                }
                s.flow += 1;
                s.pairs.push((c == b'[', false));
                s.plain = false;
                s.start = true;
                if s.depth() > max {
                    return true;
                }
            }
            _ if s.plain => {}
            b'\'' | b'"' if s.start => {
                s.quote = Some(c);
                s.start = false;
            }
            b'&' | b'!' | b'*' if s.start => {
                // Anchor, tag or alias: a token up to white space (or a flow indicator).
                while j + 1 < b.len()
                    && !matches!(b[j + 1], b' ' | b'\t')
                    && !(s.flow > 0 && matches!(b[j + 1], b',' | b'[' | b']' | b'{' | b'}'))
                {
                    j += 1;
                }
                s.start = c != b'*';
            }
            b'|' | b'>' if s.start && s.flow == 0 => {
                s.block_scalar = Some(s.indents.last().map_or(-1, |&c| c as isize));
                break;
            }
            _ if s.start => {
                s.plain = true;
                s.start = false;
            }
            _ => {}
        }
        j += 1;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth_ok(text: &str, max: usize) -> bool {
        first_line_deeper_than(text, max).is_none()
    }

    #[test]
    fn counts_flow_and_block_nesting() {
        assert!(depth_ok("[[[1]]]", 3));
        assert!(!depth_ok("[[[1]]]", 2));
        assert!(depth_ok("{a: {b: {c: 1}}}", 3));
        assert!(!depth_ok("{a: {b: {c: 1}}}", 2));
        // An implicit key in a flow sequence is a mapping of its own: [ (1) → a: (2) → [ (3)
        // → b: (4); the next entry of the same sequence starts without it.
        assert!(!depth_ok("[a: [b: 1]]", 3));
        assert!(depth_ok("[a: [b: 1]]", 4));
        assert!(depth_ok("[a: 1, b: 2, [c]]", 2));
        assert!(!depth_ok("- - - x\n", 2));
        assert!(depth_ok("- - - x\n", 3));
        assert!(!depth_ok("? ? ? x\n", 2));
        let block = "a:\n  b:\n    c:\n      d: 1\n";
        assert!(depth_ok(block, 4));
        assert!(!depth_ok(block, 3));
        // a (1) → sequence (2) → b (3) → [ (4) → [ (5) → { (6)
        assert!(!depth_ok("a:\n  - b: [ [ {x: 1} ] ]\n", 5));
        assert!(depth_ok("a:\n  - b: [ [ {x: 1} ] ]\n", 6));
        // A multi-line flow collection keeps its depth across lines.
        assert!(!depth_ok("a: [\n [\n  [\n   1]]]\n", 3));
    }

    #[test]
    fn ignores_brackets_in_scalars_comments_and_block_scalars() {
        let doc = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x # [[[[\ndata:\n  re: ^[a-z]+$ [[[[\n  q: \"[[[[\"\n  s: '[[ '' [['\n  script: |\n    echo '[[[[[['\n    {{{{{{{{\n\n    ]]]]\n  after: [1]\n";
        assert!(depth_ok(doc, 3), "{:?}", first_line_deeper_than(doc, 3));
        // A quoted scalar over several lines.
        assert!(depth_ok("a: \"[[[\n  [[[[\"\nb: 1\n", 1));
        // Line breaks other than LF end a comment as they do for libyaml; a BOM is skipped.
        assert!(!depth_ok("# x\u{2028}[[[1]]]", 2));
        assert!(!depth_ok("# x\r[[[1]]]", 2));
        assert!(!depth_ok("# x\u{85}[[[1]]]", 2));
        assert!(!depth_ok("\u{feff}[[[1]]]", 2));
        assert!(depth_ok("a:\r\n  b: 1\r\n", 2));
        // Documents reset the block structure.
        assert!(depth_ok("a:\n  b: 1\n---\nc:\n  d: 1\n", 2));
    }

    #[test]
    fn refuses_large_and_deep_input_at_once() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(
            check_yaml(&deep, SECRET),
            Err(YamlLimitError::TooDeep {
                max: MAX_DEPTH,
                line: 1
            })
        );
        let deep_map = "{a: ".repeat(50_000);
        assert!(matches!(
            check_yaml(&deep_map, SECRET),
            Err(YamlLimitError::TooDeep { .. })
        ));
        let dashes = format!("{}x\n", "- ".repeat(100_000));
        assert!(check_yaml(&dashes, SECRET).is_err());
        let big = "a: 1\n".repeat(REGISTRIES.max_bytes / 5 + 1);
        assert!(matches!(
            check_yaml(&big, REGISTRIES),
            Err(YamlLimitError::TooLarge { .. })
        ));
        assert_eq!(check_yaml("a: [1, {b: 2}]\n", REGISTRIES), Ok(()));
    }

    #[test]
    fn kilns_own_examples_pass() {
        for f in [
            "recipes/manifests/nvidia-runtimeclass.yaml",
            "recipes/manifests/nvidia-device-plugin.yaml",
            "src/pipeline/assets/seed/network-config.tera",
        ] {
            let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
            let t = std::fs::read_to_string(&p).unwrap();
            assert_eq!(check_yaml(&t, MANIFEST), Ok(()), "{f}");
            // Deep enough to count something, and not more than the parser sees.
            assert!(first_line_deeper_than(&t, 12).is_none(), "{f}");
        }
    }

    /// Every way to nest 130 levels refused (serde_yaml's own limit is 128), and the fuzz
    /// entry's property on the committed seeds and on these.
    #[test]
    fn no_form_of_deep_nesting_passes() {
        let n = 130;
        let indented: String = (0..n).map(|i| format!("{}k:\n", " ".repeat(i))).collect();
        let seq_in_map: String = (0..n)
            .map(|i| format!("{}- k:\n", "  ".repeat(i)))
            .collect();
        let forms = [
            "[".repeat(n),
            "{a: ".repeat(n),
            "{\"a\":".repeat(n),
            "- ".repeat(n) + "x",
            "? ".repeat(n) + "x",
            indented,
            seq_in_map,
            format!("a: &x !t {}", "[".repeat(n)),
            format!("--- {}", "[".repeat(n)),
            format!("# c\u{2028}{}", "[".repeat(n)),
            format!("\u{feff}{}", "[".repeat(n)),
            format!("a: [\n{}", "[\n".repeat(n)),
            format!("a: \"x\"\nb: [{}", "[ ".repeat(n)),
        ];
        for f in &forms {
            assert!(
                matches!(check_yaml(f, SECRET), Err(YamlLimitError::TooDeep { .. })),
                "passed: {:?}",
                &f[..f.len().min(60)]
            );
            crate::testing::fuzz::fuzz_yaml_limits(f.as_bytes());
        }
        let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/yaml_limits");
        for e in std::fs::read_dir(seeds).unwrap() {
            crate::testing::fuzz::fuzz_yaml_limits(&std::fs::read(e.unwrap().path()).unwrap());
        }
    }
}
