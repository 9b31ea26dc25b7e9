//! Redis's glob-style pattern matching (`*`, `?`, `[abc]`, `[^a-z]`, `\x`),
//! so the in-process broker routes patterns exactly as Redis would.

/// True when `text` matches the Redis glob `pattern`, exactly as Redis's
/// `stringmatchlen` decides it, quirks included: an unterminated class
/// `[bc` is a class of what follows, `[a-]` takes `]` as the end of a range,
/// and an empty name is matched only by an empty pattern. A differential
/// test runs the same patterns and names through a real redis-server.
#[must_use]
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let mut give_up = false;
    matches(pattern, text, &mut give_up, 0)
}

/// Deepest `*` nesting tried, as in Redis: a pattern of more stars than this
/// matches nothing rather than recursing further.
const MAX_NESTING: usize = 1000;

/// The byte at `i`, or 0 past the end (where Redis reads its strings'
/// terminating NUL).
fn at(bytes: &[u8], i: usize) -> u8 {
    bytes.get(i).copied().unwrap_or(0)
}

/// One level of Redis's matcher. `give_up` is its `skipLongerMatches`: once
/// the rest of the pattern after a `*` matched nowhere in the rest of the
/// text, no earlier `*` can make it match either.
fn matches(mut p: &[u8], mut s: &[u8], give_up: &mut bool, nesting: usize) -> bool {
    if nesting > MAX_NESTING {
        return false;
    }
    while !p.is_empty() && !s.is_empty() {
        // Whether the pattern byte just handled is consumed (an unterminated
        // class has already consumed the whole rest of the pattern).
        let mut advance = true;
        match p[0] {
            b'*' => {
                while p.len() > 1 && p[1] == b'*' {
                    p = &p[1..];
                }
                if p.len() == 1 {
                    return true;
                }
                while !s.is_empty() {
                    if matches(&p[1..], s, give_up, nesting + 1) {
                        return true;
                    }
                    if *give_up {
                        return false;
                    }
                    s = &s[1..];
                }
                *give_up = true;
                return false;
            }
            b'?' => s = &s[1..],
            b'[' => {
                p = &p[1..];
                let negate = at(p, 0) == b'^';
                if negate {
                    p = &p[1..];
                }
                let c = s[0];
                let mut matched = false;
                loop {
                    if at(p, 0) == b'\\' && p.len() >= 2 {
                        p = &p[1..];
                        matched |= p[0] == c;
                    } else if at(p, 0) == b']' {
                        break;
                    } else if p.is_empty() {
                        advance = false;
                        break;
                    } else if p.len() >= 3 && p[1] == b'-' {
                        let (lo, hi) = if p[0] <= p[2] {
                            (p[0], p[2])
                        } else {
                            (p[2], p[0])
                        };
                        matched |= (lo..=hi).contains(&c);
                        p = &p[2..];
                    } else {
                        matched |= p[0] == c;
                    }
                    p = &p[1..];
                }
                if matched == negate {
                    return false;
                }
                s = &s[1..];
            }
            first => {
                let literal = if first == b'\\' && p.len() >= 2 {
                    p = &p[1..];
                    p[0]
                } else {
                    first
                };
                if literal != s[0] {
                    return false;
                }
                s = &s[1..];
            }
        }
        if advance {
            p = &p[1..];
        }
        if s.is_empty() {
            while at(p, 0) == b'*' {
                p = &p[1..];
            }
            break;
        }
    }
    p.is_empty() && s.is_empty()
}

/// Redis treats a channel name containing `*`, `?` or `[` as a glob pattern.
#[must_use]
pub fn is_pattern(channel: &str) -> bool {
    channel.contains(['*', '?', '['])
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
        assert!(
            !m("*", ""),
            "Redis: an empty name matches only an empty pattern"
        );
        assert!(m("", ""));
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
        // An unterminated class is a class of the rest of the pattern.
        assert!(m("a[bc", "ab"));
        assert!(m("a[bc", "ac"));
        assert!(!m("a[bc", "abc"));
        assert!(!m("a[", "a"));
    }
}
