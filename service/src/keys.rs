//! Redis key building. One key per (domain, descriptor entries, algorithm, unit):
//!
//! `<prefix>:{<domain>|<k1>=<v1>|<k2>=<v2>}:<algorithm>:<unit>`
//!
//! The part in braces is a Redis Cluster hash tag, so every key of one descriptor lives in one
//! slot. Domain, keys and values are percent-escaped (`%`, `{`, `}`, `|`, `=`, control bytes,
//! space and non-ASCII bytes), so no value can close the hash tag or forge another descriptor's
//! key. If the escaped tag would be longer than `MAX_TAG_BYTES`, it is replaced by `#` followed by
//! the SHA-1 (hex) of the unescaped material, which keeps keys short whatever clients send.

use crate::config::{Algorithm, Unit};

pub const MAX_TAG_BYTES: usize = 256;

fn escape_into(out: &mut String, s: &str) {
    escape_with(out, s, b"");
}

/// As `escape_into`, also escaping the bytes of `extra`.
fn escape_with(out: &mut String, s: &str, extra: &[u8]) {
    for b in s.bytes() {
        let plain = b.is_ascii_graphic()
            && !matches!(b, b'%' | b'{' | b'}' | b'|' | b'=' | b'#')
            && !extra.contains(&b);
        if plain {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(hex_digit(b >> 4));
            out.push(hex_digit(b & 0xf));
        }
    }
}

fn hex_digit(n: u8) -> char {
    match n {
        0..=9 => (b'0' + n) as char,
        _ => (b'A' + n - 10) as char,
    }
}

/// The hash-tag content for a descriptor.
pub fn tag<'a>(domain: &str, entries: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let entries: Vec<(&str, &str)> = entries.into_iter().collect();
    let mut t = String::new();
    escape_into(&mut t, domain);
    for (k, v) in &entries {
        t.push('|');
        escape_into(&mut t, k);
        t.push('=');
        escape_into(&mut t, v);
    }
    if t.len() <= MAX_TAG_BYTES {
        return t;
    }
    // Unambiguous raw material: lengths prefix every part.
    let mut h = sha1_smol::Sha1::new();
    for part in std::iter::once(domain).chain(entries.iter().flat_map(|(k, v)| [*k, *v])) {
        h.update(&(part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    format!("#{}", h.digest())
}

pub fn key<'a>(
    prefix: &str,
    domain: &str,
    entries: impl IntoIterator<Item = (&'a str, &'a str)>,
    algorithm: Algorithm,
    unit: Unit,
) -> String {
    format!("{prefix}:{{{}}}:{}:{}", tag(domain, entries), algorithm.tag(), unit.tag())
}

/// The record of an idempotency key: `<prefix>:idem:{<domain>:<key>}`, the braces a Redis Cluster
/// hash tag. The domain is escaped as descriptor parts are, and its `:` too, so that the first
/// bare `:` in the tag ends the domain (`a:b` + `c` and `a` + `b:c` are different records); an
/// escaped domain longer than `MAX_TAG_BYTES` is replaced by `#` and its SHA-1. `key` is one of
/// the idempotency key's own characters (`A-Z a-z 0-9 . _ : -`), checked by the caller.
pub fn idempotency_key(prefix: &str, domain: &str, key: &str) -> String {
    let mut d = String::new();
    escape_with(&mut d, domain, b":");
    if d.len() > MAX_TAG_BYTES {
        d = format!("#{}", sha1_smol::Sha1::from(domain).digest());
    }
    format!("{prefix}:idem:{{{d}:{key}}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_descriptor_key_is_readable() {
        let k = key(
            "rl",
            "edge",
            [("remote_address", "10.0.0.1"), ("path", "/api/v1")],
            Algorithm::FixedWindow,
            Unit::Minute,
        );
        assert_eq!(k, "rl:{edge|remote_address=10.0.0.1|path=/api/v1}:fw:m");
    }

    #[test]
    fn special_bytes_are_escaped_so_the_tag_cannot_be_broken() {
        let k = key("rl", "d", [("k", "a}b{c|x=y%z #é\n")], Algorithm::TokenBucket, Unit::Second);
        assert_eq!(k, "rl:{d|k=a%7Db%7Bc%7Cx%3Dy%25z%20%23%C3%A9%0A}:tb:s");
        // Exactly one `{` and one `}` in the key: the hash tag is the whole descriptor.
        assert_eq!(k.matches('{').count(), 1);
        assert_eq!(k.matches('}').count(), 1);
    }

    #[test]
    fn different_entry_splits_give_different_keys() {
        let a = tag("d", [("a", "b|c=d")]);
        let b = tag("d", [("a", "b"), ("c", "d")]);
        assert_ne!(a, b);
        let a = tag("d", [("a=b", "")]);
        let b = tag("d", [("a", "=b")]);
        assert_ne!(a, b);
    }

    #[test]
    fn long_material_is_hashed_and_stays_distinct() {
        let long = "x".repeat(1000);
        let t1 = tag("d", [("k", long.as_str())]);
        assert!(t1.starts_with('#'));
        assert_eq!(t1.len(), 41);
        let long2 = format!("{long}y");
        let t2 = tag("d", [("k", long2.as_str())]);
        assert_ne!(t1, t2);
        // A short value can never produce a `#...` tag, because `#` is escaped.
        let t3 = tag("#abc", []);
        assert_eq!(t3, "%23abc");
    }

    #[test]
    fn algorithm_and_unit_separate_counters() {
        let a = key("rl", "d", [("k", "v")], Algorithm::FixedWindow, Unit::Second);
        let b = key("rl", "d", [("k", "v")], Algorithm::SlidingWindow, Unit::Second);
        let c = key("rl", "d", [("k", "v")], Algorithm::FixedWindow, Unit::Minute);
        assert!(a != b && a != c && b != c);
    }

    #[test]
    fn idempotency_keys_are_hash_tagged_and_unambiguous() {
        assert_eq!(idempotency_key("rl", "edge", "k-1"), "rl:idem:{edge:k-1}");
        assert_ne!(idempotency_key("rl", "a:b", "c"), idempotency_key("rl", "a", "b:c"));
        assert_eq!(idempotency_key("rl", "a:b}{", "c"), "rl:idem:{a%3Ab%7D%7B:c}");
        let long = idempotency_key("rl", &"x".repeat(1000), "k");
        assert!(long.starts_with("rl:idem:{#") && long.ends_with(":k}") && long.len() < 60, "{long}");
        assert_ne!(long, idempotency_key("rl", &"x".repeat(1001), "k"));
    }
}
