//! Channel patterns (`channels` API, allowed origins): Redis-style globs.

/// Glob match: `*` any run, `?` one character, `[abc]`/`[a-z]`/`[!a]` a class, `\\` escapes.
pub fn glob_match(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0usize, 0usize);
    let (mut star_p, mut star_i) = (usize::MAX, 0usize);
    while i < s.len() {
        if p < pat.len() {
            match pat[p] {
                b'*' => {
                    star_p = p;
                    star_i = i;
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    i += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, next)) = glob_class(pat, p, s[i]) {
                        if matched {
                            p = next;
                            i += 1;
                            continue;
                        }
                    } else if s[i] == b'[' {
                        p += 1;
                        i += 1;
                        continue;
                    }
                }
                b'\\' if p + 1 < pat.len() && pat[p + 1] == s[i] => {
                    p += 2;
                    i += 1;
                    continue;
                }
                c if c == s[i] => {
                    p += 1;
                    i += 1;
                    continue;
                }
                _ => {}
            }
        }
        if star_p == usize::MAX {
            return false;
        }
        p = star_p + 1;
        star_i += 1;
        i = star_i;
    }
    pat[p..].iter().all(|&c| c == b'*')
}

/// Matches `c` against the class starting at `pat[p] == '['`; returns (matched, index after `]`).
fn glob_class(pat: &[u8], p: usize, c: u8) -> Option<(bool, usize)> {
    let mut j = p + 1;
    let negate = j < pat.len() && (pat[j] == b'!' || pat[j] == b'^');
    if negate {
        j += 1;
    }
    let mut matched = false;
    let mut first = true;
    while j < pat.len() && (pat[j] != b']' || first) {
        first = false;
        if j + 2 < pat.len() && pat[j + 1] == b'-' && pat[j + 2] != b']' {
            if pat[j] <= c && c <= pat[j + 2] {
                matched = true;
            }
            j += 3;
        } else {
            if pat[j] == c {
                matched = true;
            }
            j += 1;
        }
    }
    (j < pat.len()).then_some((matched != negate, j + 1))
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn patterns() {
        let m = |p: &str, s: &str| glob_match(p.as_bytes(), s.as_bytes());
        assert!(m("*", "anything"));
        assert!(m("chat:*", "chat:room"));
        assert!(!m("chat:*", "news:room"));
        assert!(m("h?llo", "hello") && !m("h?llo", "hllo"));
        assert!(m("[abc]x", "bx") && !m("[abc]x", "dx"));
        assert!(m("[a-c]x", "bx") && m("[!a-c]x", "dx") && !m("[!a-c]x", "ax"));
        assert!(m("a\\*b", "a*b") && !m("a\\*b", "axb"));
        assert!(m("https://*.example.com", "https://app.example.com"));
        assert!(!m("https://*.example.com", "https://example.com.evil.net"));
    }
}
