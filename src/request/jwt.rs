//! Reading a claim from the JWT in `Authorization: Bearer`. The payload is decoded only: the
//! signature is not checked here. Put Envoy's `jwt_authn` filter before this one to verify it.

/// The claim at `path` (dots separate nested objects: `org.plan`) of the bearer token in the
/// `Authorization` header value. Strings are returned as they are; numbers and booleans in their
/// JSON spelling; anything else, a malformed token or a missing claim gives `None`.
pub fn claim(authorization: &[u8], path: &str) -> Option<Vec<u8>> {
    let token = bearer_token(authorization)?;
    let mut parts = token.split(|&b| b == b'.');
    let (_header, payload) = (parts.next()?, parts.next()?);
    parts.next()?; // a signature part must be present, even if empty
    let json = base64url_decode(payload)?;
    let value: serde_json::Value = serde_json::from_slice(&json).ok()?;
    let mut at = &value;
    for segment in path.split('.') {
        at = at.as_object()?.get(segment)?;
    }
    match at {
        serde_json::Value::String(s) => Some(s.as_bytes().to_vec()),
        serde_json::Value::Number(n) => Some(n.to_string().into_bytes()),
        serde_json::Value::Bool(b) => Some(b.to_string().into_bytes()),
        _ => None,
    }
}

fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let (scheme, rest) = value.split_at(value.iter().position(|&b| b == b' ')?);
    scheme.eq_ignore_ascii_case(b"bearer").then(|| rest.trim_ascii()).filter(|t| !t.is_empty())
}

/// Base64url without padding (padding tolerated), as JWTs use.
fn base64url_decode(input: &[u8]) -> Option<Vec<u8>> {
    let sextet = |b: u8| -> Option<u32> {
        Some(match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        } as u32)
    };
    let input = input.strip_suffix(b"==").or_else(|| input.strip_suffix(b"=")).unwrap_or(input);
    if input.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(input.len() * 3 / 4);
    for chunk in input.chunks(4) {
        let mut acc = 0u32;
        for (i, &b) in chunk.iter().enumerate() {
            acc |= sextet(b)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// {"alg":"none"} . {"sub":"alice","plan":"pro","org":{"tier":"gold"},"n":7} . (no signature)
    const TOKEN: &str =
        "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSIsInBsYW4iOiJwcm8iLCJvcmciOnsidGllciI6ImdvbGQifSwibiI6N30.";

    fn get(header: &str, path: &str) -> Option<String> {
        claim(header.as_bytes(), path).map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn reads_top_level_and_nested_claims() {
        let header = format!("Bearer {TOKEN}");
        assert_eq!(get(&header, "plan").as_deref(), Some("pro"));
        assert_eq!(get(&header, "org.tier").as_deref(), Some("gold"));
        assert_eq!(get(&header, "n").as_deref(), Some("7"));
        assert_eq!(get(&header, "missing"), None);
        assert_eq!(get(&header, "org"), None, "objects are not values");
    }

    #[test]
    fn the_scheme_is_case_insensitive_and_others_are_ignored() {
        assert_eq!(get(&format!("bearer  {TOKEN} "), "sub").as_deref(), Some("alice"));
        assert_eq!(get(&format!("Basic {TOKEN}"), "sub"), None);
        assert_eq!(get("Bearer", "sub"), None);
    }

    #[test]
    fn malformed_tokens_give_nothing_and_never_panic() {
        for bad in [
            "Bearer a.b",
            "Bearer a.!!!.c",
            "Bearer a.eyJ.c",
            "Bearer ..",
            "Bearer a.bnVsbA.c",
            "Bearer a.x.c",
        ] {
            assert_eq!(get(bad, "sub"), None, "{bad}");
        }
        assert_eq!(claim(&[0xff, b' ', 0xfe], "sub"), None);
    }

    #[test]
    fn decodes_base64url_with_and_without_padding() {
        assert_eq!(base64url_decode(b"aGk").as_deref(), Some(&b"hi"[..]));
        assert_eq!(base64url_decode(b"aGk=").as_deref(), Some(&b"hi"[..]));
        assert_eq!(base64url_decode(b"_-8").as_deref(), Some(&[0xff, 0xef][..]));
        assert_eq!(base64url_decode(b"a"), None);
    }
}
