//! Redis's glob-style pattern matching (`*`, `?`, `[abc]`, `[^a-z]`, `\x`),
//! so the in-process broker routes patterns exactly as Redis would.

/// True when `text` matches the Redis glob `pattern`.
#[must_use]
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    // Iterative matcher with single-star backtracking: linear in practice and
    // never recursive, so a hostile pattern cannot blow the stack.
    let (mut p, mut t) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    backtrack = Some((p, t));
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    t += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, next)) = match_class(pattern, p, text[t])
                        && matched
                    {
                        p = next;
                        t += 1;
                        continue;
                    }
                }
                b'\\' if p + 1 < pattern.len() => {
                    if pattern[p + 1] == text[t] {
                        p += 2;
                        t += 1;
                        continue;
                    }
                }
                c => {
                    if c == text[t] {
                        p += 1;
                        t += 1;
                        continue;
                    }
                }
            }
        }
        match backtrack {
            Some((star, from)) => {
                p = star + 1;
                t = from + 1;
                backtrack = Some((star, from + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Matches `c` against the class starting at `pattern[start] == b'['`.
/// Returns whether it matched and the index just past the class.
fn match_class(pattern: &[u8], start: usize, c: u8) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = pattern.get(i) == Some(&b'^');
    if negate {
        i += 1;
    }
    let mut matched = false;
    loop {
        let &first = pattern.get(i)?;
        if first == b']' {
            break;
        }
        let first = if first == b'\\' {
            i += 1;
            *pattern.get(i)?
        } else {
            first
        };
        if pattern.get(i + 1) == Some(&b'-') && pattern.get(i + 2).is_some_and(|&e| e != b']') {
            let end = pattern[i + 2];
            let (lo, hi) = if first <= end {
                (first, end)
            } else {
                (end, first)
            };
            matched |= (lo..=hi).contains(&c);
            i += 3;
        } else {
            matched |= first == c;
            i += 1;
        }
    }
    Some((matched != negate, i + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, t: &str) -> bool {
        glob_match(p.as_bytes(), t.as_bytes())
    }

    #[test]
    fn literals_and_wildcards() {
        assert!(m("quotes", "quotes"));
        assert!(!m("quotes", "quote"));
        assert!(m("quotes.*", "quotes.AAPL"));
        assert!(m("quotes.*", "quotes."));
        assert!(!m("quotes.*", "quotes"));
        assert!(m("*", ""));
        assert!(m("a*b*c", "aXXbYYc"));
        assert!(!m("a*b*c", "aXXbYY"));
        assert!(m("q?", "q1"));
        assert!(!m("q?", "q"));
        assert!(m("client.*", "client.acme"));
    }

    #[test]
    fn classes_and_escapes() {
        assert!(m("h[ae]llo", "hello"));
        assert!(!m("h[ae]llo", "hillo"));
        assert!(m("h[^e]llo", "hallo"));
        assert!(!m("h[^e]llo", "hello"));
        assert!(m("h[a-c]llo", "hbllo"));
        assert!(m("a\\*b", "a*b"));
        assert!(!m("a\\*b", "aXb"));
        // An unterminated class never matches rather than panicking.
        assert!(!m("a[bc", "ab"));
    }
}
