//! A request's rate-limit key: the fingerprint of its bucket under each limit (the table's
//! addresses are built in `state::slot`), its text for the violation log, and the value of each
//! key part.

use std::hash::Hasher;

use sha2::{Digest, Sha256};
use siphasher::sip::SipHasher13;

use super::jwt;
use super::Request;
use crate::config::{Idempotency, KeyPart, LimitKind, MissingKeyPolicy, Rule};
use crate::state::Fingerprint;

/// The second half of the 128-bit SipHash key; the first is the process's random seed.
const KEY_DOMAIN: u64 = u64::from_le_bytes(*b"rl-wasm1");

/// A rule's key for one request, before it is narrowed to one limit (and plan). Fingerprints are
/// SipHash-1-3 keyed with the shared seed, over a specified encoding (tag byte, length as 8 bytes
/// little-endian, bytes), so a module built by another compiler reads the same buckets.
#[derive(Clone)]
pub struct RuleKey {
    hasher: SipHasher13,
}

impl RuleKey {
    /// The fingerprint of one limit's bucket: the rule key, the plan (limits of different plans
    /// are different buckets), the limit's position in its list and its algorithm. The algorithm
    /// is part of it because each reads the stored state its own way: a configuration that
    /// changes a limit's algorithm starts that limit afresh instead of misreading the old state.
    pub fn limit(&self, plan: Option<&str>, limit_index: usize, kind: LimitKind) -> Fingerprint {
        let mut hasher = self.hasher;
        write_part(&mut hasher, 0xfe, plan.unwrap_or("").as_bytes());
        hasher.write(&(limit_index as u64).to_le_bytes());
        hasher.write(&[kind as u8]);
        Fingerprint::from_hash(hasher.finish())
    }
}

impl RuleKey {
    /// The fingerprint of the rule's lease for this key and plan (all its limits share one lease:
    /// the service grants the same units for each of the rule's descriptors).
    pub fn lease(&self, plan: Option<&str>) -> Fingerprint {
        let mut hasher = self.hasher;
        write_part(&mut hasher, 0xf8, plan.unwrap_or("").as_bytes());
        Fingerprint::from_hash(hasher.finish())
    }
}

/// Builds `rule`'s key for `request`, or `None` when a key part is missing and the rule says to
/// skip such requests.
pub fn request_key(seed: u64, rule: &Rule, request: &dyn Request) -> Option<RuleKey> {
    let mut hasher = SipHasher13::new_with_keys(seed, KEY_DOMAIN);
    write_part(&mut hasher, 0xff, rule.name.as_bytes());
    for (tag, value) in part_values(&rule.key, rule.when_key_missing, request)?.iter().enumerate() {
        write_part(&mut hasher, tag as u8, value);
    }
    Some(RuleKey { hasher })
}

/// The status endpoint's bucket for the caller: its client address, hashed apart from every
/// rule's key (another first tag).
pub fn status_key(seed: u64, request: &dyn Request, kind: LimitKind) -> Fingerprint {
    let mut hasher = SipHasher13::new_with_keys(seed, KEY_DOMAIN);
    let address = part_value(&KeyPart::ClientAddress, request).unwrap_or_default();
    write_part(&mut hasher, 0xfd, &address);
    hasher.write(&[kind as u8]);
    Fingerprint::from_hash(hasher.finish())
}

/// An idempotency key's identity: the entry, its scope parts and the key itself, so equal keys
/// of two tenants (or two entries) never meet. `None` when a scope part is missing and the entry
/// skips such requests.
pub fn idempotency_key(
    seed: u64,
    entry: &Idempotency,
    request: &dyn Request,
    key: &[u8],
) -> Option<Fingerprint> {
    let mut hasher = SipHasher13::new_with_keys(seed, KEY_DOMAIN);
    write_part(&mut hasher, 0xfc, entry.name.as_bytes());
    for (tag, value) in part_values(&entry.scope, entry.when_scope_missing, request)?.iter().enumerate() {
        write_part(&mut hasher, tag as u8, value);
    }
    write_part(&mut hasher, 0xfb, key);
    Some(Fingerprint::from_hash(hasher.finish()))
}

/// An idempotency key's name in the rate limit service, the same in every Envoy:
/// `<entry>:<SHA-256 of the scope parts and the key, hex>`. A keyed hash would differ between
/// Envoys (each has its own seed); SHA-256 lets no client make its key's name another's.
pub fn fleet_idempotency_key(entry: &Idempotency, request: &dyn Request, key: &[u8]) -> Option<String> {
    let mut digest = Sha256::new();
    for value in part_values(&entry.scope, entry.when_scope_missing, request)? {
        digest.update((value.len() as u64).to_le_bytes());
        digest.update(&value);
    }
    digest.update((key.len() as u64).to_le_bytes());
    digest.update(key);
    Some(format!("{}:{}", entry.name, hex(&digest.finalize())))
}

/// As [`request_identity`], the same in every Envoy: 32 hex digits of SHA-256.
pub fn fleet_request_identity(request: &dyn Request) -> String {
    let mut digest = Sha256::new();
    for name in [":method", ":path"] {
        let value = request.header(name).unwrap_or_default();
        digest.update((value.len() as u64).to_le_bytes());
        digest.update(&value);
    }
    hex(&digest.finalize()[..16])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a retry must repeat to be the same request: its method and its path with the query.
pub fn request_identity(seed: u64, request: &dyn Request) -> Fingerprint {
    let mut hasher = SipHasher13::new_with_keys(seed, KEY_DOMAIN);
    write_part(&mut hasher, 0xfa, &request.header(":method").unwrap_or_default());
    write_part(&mut hasher, 0xf9, &request.header(":path").unwrap_or_default());
    Fingerprint::from_hash(hasher.finish())
}

/// The key parts as readable text (`part|part`, each cut to 64 bytes, lossy UTF-8), for the
/// violation log when it is told to include keys.
pub fn key_text(rule: &Rule, request: &dyn Request) -> String {
    let mut text = String::new();
    for (i, part) in rule.key.iter().enumerate() {
        if i > 0 {
            text.push('|');
        }
        if let Some(value) = part_value(part, request) {
            let cut = &value[..value.len().min(64)];
            text.extend(String::from_utf8_lossy(cut).chars().map(|c| if c.is_control() { '?' } else { c }));
        }
    }
    text
}

/// The values of `parts` for `request`, a missing one empty; `None` when one is missing and
/// `missing` says to skip such requests.
fn part_values(parts: &[KeyPart], missing: MissingKeyPolicy, request: &dyn Request) -> Option<Vec<Vec<u8>>> {
    parts
        .iter()
        .map(|part| match (part_value(part, request), missing) {
            (Some(value), _) => Some(value),
            (None, MissingKeyPolicy::Empty) => Some(Vec::new()),
            (None, MissingKeyPolicy::Skip) => None,
        })
        .collect()
}

/// The value of one key part, `None` when the request lacks it.
pub fn part_value(part: &KeyPart, request: &dyn Request) -> Option<Vec<u8>> {
    match part {
        KeyPart::ClientAddress => request.source_address().map(|a| strip_port(&a).to_vec()),
        KeyPart::XForwardedFor { trusted_hops } => forwarded_for(request, *trusted_hops),
        KeyPart::Header(name) => request.header(name),
        KeyPart::Query(name) => request.header(":path").and_then(|p| query_param(&p, name.as_bytes())),
        KeyPart::Method => request.header(":method"),
        KeyPart::Path => request.header(":path").map(|p| path_only(&p).to_vec()),
        KeyPart::Constant(value) => Some(value.as_bytes().to_vec()),
        KeyPart::JwtClaim(claim) => request.header("authorization").and_then(|a| jwt::claim(&a, claim)),
    }
}

/// Length-prefixed so that ("ab", "c") and ("a", "bc") differ.
fn write_part(hasher: &mut SipHasher13, tag: u8, value: &[u8]) {
    hasher.write(&[tag]);
    hasher.write(&(value.len() as u64).to_le_bytes());
    hasher.write(value);
}

/// `10.0.0.1:5000` -> `10.0.0.1`, `[::1]:5000` -> `::1`; anything else unchanged.
fn strip_port(address: &[u8]) -> &[u8] {
    if let Some(rest) = address.strip_prefix(b"[") {
        if let Some(end) = rest.iter().position(|&b| b == b']') {
            return &rest[..end];
        }
        return address;
    }
    match address.iter().rposition(|&b| b == b':') {
        Some(colon) if address[..colon].iter().all(|&b| b != b':') => &address[..colon],
        _ => address,
    }
}

/// The X-Forwarded-For entry `trusted_hops` places from the right (0 = the rightmost).
fn forwarded_for(request: &dyn Request, trusted_hops: u32) -> Option<Vec<u8>> {
    let header = request.header("x-forwarded-for")?;
    let entry = header.rsplit(|&b| b == b',').nth(trusted_hops as usize)?;
    let entry = entry.trim_ascii();
    (!entry.is_empty()).then(|| entry.to_vec())
}

fn path_only(path: &[u8]) -> &[u8] {
    let end = path.iter().position(|&b| b == b'?' || b == b'#').unwrap_or(path.len());
    &path[..end]
}

/// The first value of query parameter `name`, percent-decoded (so `a%62c` and `abc` are one key).
fn query_param(path: &[u8], name: &[u8]) -> Option<Vec<u8>> {
    let start = path.iter().position(|&b| b == b'?')? + 1;
    let query = &path[start..];
    let query = &query[..query.iter().position(|&b| b == b'#').unwrap_or(query.len())];
    query.split(|&b| b == b'&').find_map(|pair| {
        let (k, v) = match pair.iter().position(|&b| b == b'=') {
            Some(eq) => (&pair[..eq], &pair[eq + 1..]),
            None => (pair, &pair[pair.len()..]),
        };
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

fn percent_decode(input: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'%' if i + 2 < input.len() => match (hex(input[i + 1]), hex(input[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::request::TestRequest;

    /// The fingerprint of the rule's only limit, for comparisons.
    fn request_key(seed: u64, rule: &Rule, request: &TestRequest) -> Option<Fingerprint> {
        super::request_key(seed, rule, request).map(|k| k.limit(None, 0, LimitKind::TokenBucket))
    }

    fn rule(key_json: &str, missing: &str) -> Rule {
        let json = format!(
            r#"{{"rules":[{{"name":"r","key":{key_json},"when_key_missing":"{missing}","limit":{{"capacity":1,"refill_period":"1s"}}}}]}}"#
        );
        Config::parse(json.as_bytes()).unwrap().rules.remove(0)
    }

    #[test]
    fn the_client_address_ignores_the_port() {
        let r = rule(r#"[{"source":"client_address"}]"#, "skip");
        let a = request_key(7, &r, &TestRequest::get("/").with_source("10.0.0.1:5000"));
        let b = request_key(7, &r, &TestRequest::get("/").with_source("10.0.0.1:6000"));
        let c = request_key(7, &r, &TestRequest::get("/").with_source("10.0.0.2:5000"));
        assert!(a.is_some());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(strip_port(b"[::1]:80"), b"::1");
        assert_eq!(strip_port(b"::1"), b"::1");
    }

    #[test]
    fn x_forwarded_for_counts_trusted_hops_from_the_right() {
        let r = rule(r#"[{"source":"x_forwarded_for","trusted_hops":1}]"#, "skip");
        let via = |xff: &str| request_key(1, &r, &TestRequest::get("/").with_header("x-forwarded-for", xff));
        assert_eq!(via("1.1.1.1, 2.2.2.2, 3.3.3.3"), via("9.9.9.9,2.2.2.2 ,8.8.8.8"));
        assert_ne!(via("1.1.1.1, 2.2.2.2, 3.3.3.3"), via("1.1.1.1, 4.4.4.4, 3.3.3.3"));
        assert_eq!(via("3.3.3.3"), None, "too few hops: the part is missing");
    }

    #[test]
    fn a_missing_part_skips_the_rule_or_counts_as_empty() {
        let skip = rule(r#"[{"source":"header","name":"x-user"}]"#, "skip");
        assert_eq!(request_key(1, &skip, &TestRequest::get("/")), None);
        let empty = rule(r#"[{"source":"header","name":"x-user"}]"#, "empty");
        let missing = request_key(1, &empty, &TestRequest::get("/"));
        assert!(missing.is_some());
        assert_eq!(missing, request_key(1, &empty, &TestRequest::get("/").with_header("x-user", "")));
    }

    #[test]
    fn query_values_are_percent_decoded_so_encodings_share_a_bucket() {
        let r = rule(r#"[{"source":"query","name":"api_key"}]"#, "skip");
        let at = |p: &str| request_key(1, &r, &TestRequest::get(p));
        assert!(at("/x?api_key=abc").is_some());
        assert_eq!(at("/x?api_key=abc"), at("/x?other=1&api%5Fkey=a%62c#frag"));
        assert_ne!(at("/x?api_key=abc"), at("/x?api_key=abd"));
        assert_eq!(at("/x?api_keyx=abc"), None);
        assert_eq!(percent_decode(b"100%"), b"100%");
        assert_eq!(percent_decode(b"%zz+%4"), b"%zz %4");
    }

    #[test]
    fn method_path_and_constant_parts_distinguish_keys() {
        let r = rule(r#"[{"source":"method"},{"source":"path"},{"source":"constant","value":"k"}]"#, "skip");
        let key = |m: &str, p: &str| request_key(1, &r, &TestRequest::get(p).with_header(":method", m));
        assert_eq!(key("GET", "/a?x=1"), key("GET", "/a?y=2"));
        assert_ne!(key("GET", "/a"), key("POST", "/a"));
        assert_ne!(key("GET", "/a"), key("GET", "/b"));
    }

    #[test]
    fn parts_are_length_prefixed_and_seeded() {
        let r = rule(r#"[{"source":"header","name":"a"},{"source":"header","name":"b"}]"#, "skip");
        let key = |a: &str, b: &str| {
            request_key(1, &r, &TestRequest::get("/").with_header("a", a).with_header("b", b))
        };
        assert_ne!(key("ab", "c"), key("a", "bc"));
        let req = TestRequest::get("/").with_header("a", "x").with_header("b", "y");
        assert_ne!(request_key(1, &r, &req), request_key(2, &r, &req));
    }

    #[test]
    fn limits_and_plans_of_one_key_are_separate_buckets() {
        let r = rule(r#"[{"source":"header","name":"x"}]"#, "skip");
        let key = super::request_key(1, &r, &TestRequest::get("/").with_header("x", "a")).unwrap();
        let tb = LimitKind::TokenBucket;
        assert_ne!(key.limit(None, 0, tb), key.limit(None, 1, tb));
        assert_ne!(key.limit(Some("free"), 0, tb), key.limit(Some("pro"), 0, tb));
        assert_eq!(key.limit(Some("free"), 0, tb), key.limit(Some("free"), 0, tb));
        assert_ne!(key.limit(None, 0, tb), key.limit(None, 0, LimitKind::FixedWindow), "another algorithm");
    }

    #[test]
    fn fingerprints_are_siphash_1_3_of_a_specified_encoding() {
        // Golden values, computed from the SipHash-1-3 specification (not from this code): a
        // module built by another compiler must find the same buckets in shared data.
        let r = rule(r#"[{"source":"header","name":"x"}]"#, "skip");
        let request = TestRequest::get("/").with_header("x", "alice");
        let key = super::request_key(0x0123_4567_89ab_cdef, &r, &request).unwrap();
        assert_eq!(key.limit(None, 0, LimitKind::TokenBucket), Fingerprint(0xfeb0_0e2b_3832_abb0));
        assert_eq!(key.limit(Some("free"), 1, LimitKind::FixedWindow), Fingerprint(0x288e_d1ca_b740_d189));
    }

    #[test]
    fn a_jwt_claim_can_be_a_key_part() {
        let r = rule(r#"[{"source":"jwt_claim","claim":"sub"}]"#, "skip");
        let token = "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSIsInBsYW4iOiJwcm8iLCJvcmciOnsidGllciI6ImdvbGQifSwibiI6N30.";
        assert!(request_key(1, &r, &TestRequest::get("/").with_header("authorization", token)).is_some());
        assert_eq!(request_key(1, &r, &TestRequest::get("/")), None);
    }

    #[test]
    fn key_text_shows_the_parts_cut_and_cleaned() {
        let r = rule(r#"[{"source":"header","name":"a"},{"source":"header","name":"b"}]"#, "skip");
        let req = TestRequest::get("/").with_header("a", "alice\n").with_header("b", "x".repeat(100));
        assert_eq!(key_text(&r, &req), format!("alice?|{}", "x".repeat(64)));
    }

    #[test]
    fn huge_and_non_utf8_values_are_fine() {
        let r = rule(r#"[{"source":"header","name":"x"}]"#, "skip");
        let huge = vec![b'a'; 1 << 20];
        assert!(request_key(1, &r, &TestRequest::get("/").with_header("x", &huge)).is_some());
        assert!(request_key(1, &r, &TestRequest::get("/").with_header("x", [0xff, 0xfe, 0x00])).is_some());
    }
}
