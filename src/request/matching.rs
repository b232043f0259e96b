//! Which rules apply to a request.

use super::Request;
use crate::config::{HeaderCondition, Matcher, PathMatch};

impl Matcher {
    /// True when every condition given holds (an empty matcher matches every request).
    pub fn matches(&self, request: &dyn Request) -> bool {
        if let Some(path_match) = &self.path {
            let Some(full) = request.header(":path") else { return false };
            let end = full.iter().position(|&b| b == b'?' || b == b'#').unwrap_or(full.len());
            let path = &full[..end];
            let ok = match path_match {
                PathMatch::Exact(p) => path == p.as_bytes(),
                PathMatch::Prefix(p) => path.starts_with(p.as_bytes()),
            };
            if !ok {
                return false;
            }
        }
        if !self.methods.is_empty() {
            let Some(method) = request.header(":method") else { return false };
            if !self.methods.iter().any(|m| m.as_bytes() == method.as_slice()) {
                return false;
            }
        }
        self.headers_match(request)
    }

    /// The header conditions alone.
    pub fn headers_match(&self, request: &dyn Request) -> bool {
        self.headers.iter().all(|h| {
            let value = request.header(&h.name);
            match &h.condition {
                HeaderCondition::Present(present) => value.is_some() == *present,
                HeaderCondition::Equals(expected) => value.as_deref() == Some(expected.as_slice()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::request::TestRequest;

    fn matcher(match_json: &str) -> crate::config::Matcher {
        let json = format!(
            r#"{{"rules":[{{"name":"r","match":{match_json},"key":[{{"source":"path"}}],"limit":{{"capacity":1,"refill_period":"1s"}}}}]}}"#
        );
        Config::parse(json.as_bytes()).unwrap().rules.remove(0).matcher
    }

    #[test]
    fn an_empty_match_applies_to_every_request() {
        assert!(matcher("{}").matches(&TestRequest::default()));
    }

    #[test]
    fn path_prefix_and_exact_path_ignore_the_query() {
        let prefix = matcher(r#"{"path_prefix":"/api/"}"#);
        assert!(prefix.matches(&TestRequest::get("/api/users?x=1")));
        assert!(!prefix.matches(&TestRequest::get("/apix")));
        let exact = matcher(r#"{"path":"/login"}"#);
        assert!(exact.matches(&TestRequest::get("/login?next=/")));
        assert!(!exact.matches(&TestRequest::get("/login/x")));
        assert!(!exact.matches(&TestRequest::default()), "no :path, no match");
    }

    #[test]
    fn methods_are_compared_case_sensitively_after_uppercasing_the_config() {
        let m = matcher(r#"{"methods":["post","PUT"]}"#);
        assert!(m.matches(&TestRequest::get("/").with_header(":method", "POST")));
        assert!(!m.matches(&TestRequest::get("/")));
    }

    #[test]
    fn header_conditions_check_presence_absence_and_value() {
        let m = matcher(
            r#"{"headers":[{"name":"X-Tier","equals":"free"},{"name":"x-internal","present":false}]}"#,
        );
        assert!(m.matches(&TestRequest::get("/").with_header("x-tier", "free")));
        assert!(!m.matches(&TestRequest::get("/").with_header("x-tier", "pro")));
        assert!(
            !m.matches(&TestRequest::get("/").with_header("x-tier", "free").with_header("x-internal", "1"))
        );
        assert!(!m.matches(&TestRequest::get("/")));
    }
}
