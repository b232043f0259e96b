//! Limits configuration in envoyproxy/ratelimit's YAML format, plus one extension (`algorithm`).
//!
//! A file holds one `domain` and a tree of `descriptors`. `--config` may name several files and/or
//! directories (every `*.yaml` / `*.yml` directly inside); a domain may appear in only one file.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::IgnoredAny;
use serde::Deserialize;

/// Time unit of a limit, as in Envoy's `RateLimitUnit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Unit {
    /// From the proto enum value (`envoy.type.v3.RateLimitUnit`).
    pub fn from_proto(v: i32) -> Option<Unit> {
        Some(match v {
            1 => Unit::Second,
            2 => Unit::Minute,
            3 => Unit::Hour,
            4 => Unit::Day,
            5 => Unit::Month,
            6 => Unit::Year,
            7 => Unit::Week,
            _ => return None,
        })
    }

    pub fn to_proto(self) -> i32 {
        match self {
            Unit::Second => 1,
            Unit::Minute => 2,
            Unit::Hour => 3,
            Unit::Day => 4,
            Unit::Month => 5,
            Unit::Year => 6,
            Unit::Week => 7,
        }
    }

    pub fn parse(s: &str) -> Option<Unit> {
        Some(match s.to_ascii_uppercase().as_str() {
            "SECOND" => Unit::Second,
            "MINUTE" => Unit::Minute,
            "HOUR" => Unit::Hour,
            "DAY" => Unit::Day,
            "WEEK" => Unit::Week,
            "MONTH" => Unit::Month,
            "YEAR" => Unit::Year,
            _ => return None,
        })
    }

    /// Nominal length in milliseconds. MONTH is 30 days and YEAR 365 days; the fixed window uses
    /// calendar months/years instead (see `calendar_period`).
    pub fn nominal_ms(self) -> u64 {
        const S: u64 = 1000;
        match self {
            Unit::Second => S,
            Unit::Minute => 60 * S,
            Unit::Hour => 3600 * S,
            Unit::Day => 86_400 * S,
            Unit::Week => 7 * 86_400 * S,
            Unit::Month => 30 * 86_400 * S,
            Unit::Year => 365 * 86_400 * S,
        }
    }

    /// Short tag used in Redis keys.
    pub fn tag(self) -> &'static str {
        match self {
            Unit::Second => "s",
            Unit::Minute => "m",
            Unit::Hour => "h",
            Unit::Day => "d",
            Unit::Week => "w",
            Unit::Month => "mo",
            Unit::Year => "y",
        }
    }
}

impl<'de> Deserialize<'de> for Unit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Unit::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown unit `{s}`, expected one of second, minute, hour, day, week, month, year"
            ))
        })
    }
}

/// Counting algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    FixedWindow,
    SlidingWindow,
    TokenBucket,
}

impl Algorithm {
    pub fn parse(s: &str) -> Option<Algorithm> {
        Some(match s {
            "fixed_window" => Algorithm::FixedWindow,
            "sliding_window" => Algorithm::SlidingWindow,
            "token_bucket" | "gcra" => Algorithm::TokenBucket,
            _ => return None,
        })
    }

    pub fn tag(self) -> &'static str {
        match self {
            Algorithm::FixedWindow => "fw",
            Algorithm::SlidingWindow => "sw",
            Algorithm::TokenBucket => "tb",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::FixedWindow => "fixed_window",
            Algorithm::SlidingWindow => "sliding_window",
            Algorithm::TokenBucket => "token_bucket",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Algorithm::parse(s).ok_or_else(|| {
            format!("unknown algorithm `{s}`, expected fixed_window, sliding_window or token_bucket")
        })
    }
}

impl<'de> Deserialize<'de> for Algorithm {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

// ---------------------------------------------------------------------------------------------
// YAML shape

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileYaml {
    domain: String,
    #[serde(default)]
    descriptors: Vec<DescriptorYaml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DescriptorYaml {
    key: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    rate_limit: Option<RateLimitYaml>,
    #[serde(default)]
    descriptors: Vec<DescriptorYaml>,
    #[serde(default)]
    shadow_mode: bool,
    /// Extension: counting algorithm for this descriptor's limit.
    #[serde(default)]
    algorithm: Option<Algorithm>,
    /// envoyproxy/ratelimit: every value matching this wildcard (`value: prefix*`) counts against
    /// one shared counter instead of one counter per value.
    #[serde(default)]
    share_threshold: bool,
    /// envoyproxy/ratelimit: over its limit, this descriptor denies a request only when every
    /// quota-mode descriptor of the request is over.
    #[serde(default)]
    quota_mode: bool,
    // envoyproxy/ratelimit fields this service accepts and ignores, each with a WARN, so that
    // configurations written for it load (see `IGNORED_FIELDS`).
    #[serde(default)]
    detailed_metric: Option<IgnoredAny>,
    #[serde(default)]
    value_to_metric: Option<IgnoredAny>,
    #[serde(default)]
    name: Option<IgnoredAny>,
    #[serde(default)]
    metadata: Option<IgnoredAny>,
}

/// Why each accepted-but-ignored field is ignored, for the WARN line and the README.
const IGNORED_FIELDS: [(&str, &str); 4] = [
    ("detailed_metric", "metrics here are per domain, not per descriptor value"),
    ("value_to_metric", "metrics here are per domain, not per descriptor value"),
    ("name", "only rate_limit.name is used"),
    ("metadata", "it is only descriptive"),
];

impl DescriptorYaml {
    fn ignored_present(&self) -> [bool; 4] {
        [
            self.detailed_metric.is_some(),
            self.value_to_metric.is_some(),
            self.name.is_some(),
            self.metadata.is_some(),
        ]
    }

    /// One warning per ignored field given at `here`.
    fn ignored_warnings(&self, here: &str) -> impl Iterator<Item = String> + '_ {
        let here = here.to_string();
        IGNORED_FIELDS
            .iter()
            .zip(self.ignored_present())
            .filter(|(_, given)| *given)
            .map(move |((field, why), _)| format!("{here}.{field}: accepted and ignored ({why})"))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplacesYaml {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitYaml {
    #[serde(default)]
    unit: Option<Unit>,
    #[serde(default)]
    requests_per_unit: Option<u32>,
    #[serde(default)]
    unlimited: bool,
    /// Reported as `current_limit.name`; what `replaces` refers to.
    #[serde(default)]
    name: Option<String>,
    /// Names of limits this one replaces when both apply to one request (envoyproxy/ratelimit).
    #[serde(default)]
    replaces: Vec<ReplacesYaml>,
}

// ---------------------------------------------------------------------------------------------
// Compiled form

/// What the configuration says about one descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub limit: RuleLimit,
    pub shadow_mode: bool,
    pub algorithm: Option<Algorithm>,
    pub name: String,
    /// Names of the limits this one replaces when both apply to one request.
    pub replaces: Vec<String>,
    /// envoyproxy/ratelimit's `quota_mode` (see `service::request_is_over`).
    pub quota_mode: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleLimit {
    /// No `rate_limit` at this node: the descriptor is not limited.
    None,
    Unlimited,
    Limited {
        requests_per_unit: u32,
        unit: Unit,
    },
}

#[derive(Debug, Default)]
struct Level {
    /// key -> value -> node
    exact: HashMap<String, HashMap<String, Node>>,
    /// (key, value prefix, node) for values ending in `*`, longest prefix first.
    prefix: Vec<(String, String, Node)>,
    /// key-only entries (no `value`): match any value.
    key_only: HashMap<String, Node>,
}

#[derive(Debug)]
struct Node {
    rule: Rule,
    /// `share_threshold` on a `value: prefix*` entry: matching values share one counter.
    share_threshold: bool,
    children: Level,
}

impl Level {
    fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefix.is_empty() && self.key_only.is_empty()
    }

    /// The node for one entry, and the value prefix when a `prefix*` entry matched.
    fn find(&self, key: &str, value: &str) -> Option<(&Node, Option<&str>)> {
        if let Some(n) = self.exact.get(key).and_then(|m| m.get(value)) {
            return Some((n, None));
        }
        if let Some((_, p, n)) =
            self.prefix.iter().find(|(k, p, _)| k == key && value.starts_with(p.as_str()))
        {
            return Some((n, Some(p.as_str())));
        }
        self.key_only.get(key).map(|n| (n, None))
    }
}

/// All domains' limits.
#[derive(Debug, Default)]
pub struct Config {
    domains: HashMap<String, Level>,
    /// Files the configuration was read from, for messages.
    pub sources: Vec<PathBuf>,
    /// Fields accepted but ignored, one line each (file and place), to log as WARN.
    pub warnings: Vec<String>,
}

impl Config {
    /// Finds the rule for a descriptor (its `(key, value)` entries, in order), like
    /// envoyproxy/ratelimit: at each level an exact `key`+`value` entry wins over a `value: prefix*`
    /// entry, which wins over a key-only entry; the rule is the node reached by the last entry.
    pub fn lookup<'a>(
        &self,
        domain: &str,
        entries: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Option<&Rule> {
        self.lookup_shared(domain, entries).map(|(rule, _)| rule)
    }

    /// As `lookup`, with, per entry, the wildcard prefix whose `share_threshold` makes every
    /// matching value share one counter (`None`: the entry's own value keys the counter).
    pub fn lookup_shared<'a>(
        &self,
        domain: &str,
        entries: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Option<(&Rule, Vec<Option<&str>>)> {
        let mut level = self.domains.get(domain)?;
        let mut node: Option<&Node> = None;
        let mut shared = Vec::new();
        for (k, v) in entries {
            let (n, prefix) = level.find(k, v)?;
            shared.push(prefix.filter(|_| n.share_threshold));
            node = Some(n);
            level = &n.children;
        }
        node.map(|n| (&n.rule, shared))
    }

    /// Whether `domain` is configured with at least one descriptor.
    pub fn has_descriptors(&self, domain: &str) -> bool {
        self.domains.get(domain).is_some_and(|l| !l.is_empty())
    }

    pub fn domain_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.domains.keys().cloned().collect();
        v.sort();
        v
    }

    /// Parses one YAML document (one domain). `origin` names it in errors.
    fn add_yaml(&mut self, origin: &str, text: &str) -> Result<(), String> {
        let file: FileYaml = parse_yaml(text).map_err(|e| format!("{origin}: {e}"))?;
        if file.domain.is_empty() {
            return Err(format!("{origin}: `domain` must not be empty"));
        }
        if self.domains.contains_key(&file.domain) {
            return Err(format!("{origin}: domain `{}` is defined in more than one file", file.domain));
        }
        let level = compile_level(&file.descriptors, &format!("{origin}: descriptors"), &mut self.warnings)?;
        self.domains.insert(file.domain, level);
        Ok(())
    }

    /// Parses a single YAML text (tests and tools).
    pub fn from_yaml(origin: &str, text: &str) -> Result<Config, String> {
        let mut c = Config::default();
        c.add_yaml(origin, text)?;
        Ok(c)
    }

    /// Loads every configured path. Returns the config and the raw bytes read (the signature the
    /// reloader compares).
    pub fn load(paths: &[PathBuf]) -> Result<(Config, Vec<u8>), String> {
        let files = list_files(paths)?;
        let mut c = Config::default();
        let mut sig = Vec::new();
        for f in &files {
            let text = std::fs::read_to_string(f)
                .map_err(|e| format!("cannot read config file {}: {e}", f.display()))?;
            sig.extend_from_slice(f.to_string_lossy().as_bytes());
            sig.push(0);
            sig.extend_from_slice(text.as_bytes());
            sig.push(0);
            c.add_yaml(&f.display().to_string(), &text)?;
        }
        c.sources = files;
        Ok((c, sig))
    }
}

/// serde-saphyr: maintained, panic-free, with limits on aliases and nesting by default (serde_yaml
/// is deprecated). Errors carry line and column; its multi-line source snippet is turned off so a
/// bad file is one log line.
fn parse_yaml<'de, T: Deserialize<'de>>(text: &'de str) -> Result<T, serde_saphyr::Error> {
    let mut options = serde_saphyr::Options::default();
    options.with_snippet = false;
    serde_saphyr::from_str_with_options(text, options)
}

/// The files named by `paths`: files as given, directories expanded to their `*.yaml`/`*.yml`
/// files (sorted, not recursive).
pub fn list_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    for p in paths {
        let meta =
            std::fs::metadata(p).map_err(|e| format!("cannot read config path {}: {e}", p.display()))?;
        if meta.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| format!("cannot list config directory {}: {e}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| is_yaml(f) && f.is_file())
                .collect();
            found.sort();
            out.extend(found);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

fn is_yaml(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("yaml") | Some("yml"))
}

/// `replaces` names, checked as envoyproxy/ratelimit does: none empty, none the limit's own name.
fn compile_replaces(r: &RateLimitYaml, here: &str) -> Result<Vec<String>, String> {
    let own = r.name.as_deref().unwrap_or_default();
    let mut out = Vec::with_capacity(r.replaces.len());
    for (i, rep) in r.replaces.iter().enumerate() {
        if rep.name.is_empty() {
            return Err(format!("{here}.rate_limit.replaces[{i}].name: must not be empty"));
        }
        if rep.name == own {
            return Err(format!(
                "{here}.rate_limit.replaces[{i}].name: a limit cannot replace itself (`{own}`)"
            ));
        }
        out.push(rep.name.clone());
    }
    Ok(out)
}

fn compile_level(list: &[DescriptorYaml], path: &str, warnings: &mut Vec<String>) -> Result<Level, String> {
    let mut level = Level::default();
    let mut seen: BTreeMap<(String, Option<String>), ()> = BTreeMap::new();
    for (i, d) in list.iter().enumerate() {
        let here = format!("{path}[{i}]");
        if d.key.is_empty() {
            return Err(format!("{here}.key: must not be empty"));
        }
        if seen.insert((d.key.clone(), d.value.clone()), ()).is_some() {
            return Err(format!(
                "{here}: duplicate descriptor key `{}`{}",
                d.key,
                d.value.as_ref().map(|v| format!(" with value `{v}`")).unwrap_or_default()
            ));
        }
        warnings.extend(d.ignored_warnings(&here));
        if d.share_threshold && !d.value.as_deref().is_some_and(|v| v.ends_with('*')) {
            return Err(format!(
                "{here}.share_threshold: only for wildcard values (`value: prefix*`), as in envoyproxy/ratelimit"
            ));
        }
        let replaces = match &d.rate_limit {
            Some(r) => compile_replaces(r, &here)?,
            None => Vec::new(),
        };
        let (limit, name) = match &d.rate_limit {
            None => (RuleLimit::None, String::new()),
            Some(r) => {
                let name = r.name.clone().unwrap_or_default();
                if r.unlimited {
                    if r.unit.is_some() || r.requests_per_unit.is_some() {
                        return Err(format!(
                            "{here}.rate_limit: `unlimited: true` cannot have `unit` or `requests_per_unit`"
                        ));
                    }
                    (RuleLimit::Unlimited, name)
                } else {
                    let unit = r.unit.ok_or_else(|| format!("{here}.rate_limit.unit: missing"))?;
                    let rpu = r
                        .requests_per_unit
                        .ok_or_else(|| format!("{here}.rate_limit.requests_per_unit: missing"))?;
                    (RuleLimit::Limited { requests_per_unit: rpu, unit }, name)
                }
            }
        };
        let node = Node {
            rule: Rule {
                limit,
                shadow_mode: d.shadow_mode,
                algorithm: d.algorithm,
                name,
                replaces,
                quota_mode: d.quota_mode,
            },
            share_threshold: d.share_threshold,
            children: compile_level(&d.descriptors, &format!("{here}.descriptors"), warnings)?,
        };
        match &d.value {
            None => {
                level.key_only.insert(d.key.clone(), node);
            }
            Some(v) if v.ends_with('*') => {
                let p = v.trim_end_matches('*').to_string();
                level.prefix.push((d.key.clone(), p, node));
            }
            Some(v) => {
                level.exact.entry(d.key.clone()).or_default().insert(v.clone(), node);
            }
        }
    }
    level.prefix.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
    Ok(level)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
domain: edge
descriptors:
  - key: remote_address
    rate_limit:
      unit: second
      requests_per_unit: 10
  - key: generic_key
    value: login
    algorithm: sliding_window
    rate_limit: {unit: MINUTE, requests_per_unit: 5, name: login}
  - key: generic_key
    value: internal
    rate_limit: {unlimited: true}
  - key: generic_key
    value: "beta-*"
    shadow_mode: true
    rate_limit: {unit: hour, requests_per_unit: 100}
  - key: generic_key
    rate_limit: {unit: day, requests_per_unit: 1000}
  - key: tenant
    descriptors:
      - key: plan
        value: pro
        algorithm: token_bucket
        rate_limit: {unit: minute, requests_per_unit: 600}
      - key: plan
        rate_limit: {unit: minute, requests_per_unit: 60}
"#;

    fn cfg() -> Config {
        Config::from_yaml("sample.yaml", SAMPLE).unwrap()
    }

    fn limited(rpu: u32, unit: Unit) -> RuleLimit {
        RuleLimit::Limited { requests_per_unit: rpu, unit }
    }

    #[test]
    fn key_only_entry_matches_any_value() {
        let c = cfg();
        let r = c.lookup("edge", [("remote_address", "10.0.0.1")]).unwrap();
        assert_eq!(r.limit, limited(10, Unit::Second));
        assert_eq!(r.algorithm, None);
    }

    #[test]
    fn exact_value_wins_over_prefix_and_key_only() {
        let c = cfg();
        let r = c.lookup("edge", [("generic_key", "login")]).unwrap();
        assert_eq!(r.limit, limited(5, Unit::Minute));
        assert_eq!(r.algorithm, Some(Algorithm::SlidingWindow));
        assert_eq!(r.name, "login");
        let r = c.lookup("edge", [("generic_key", "beta-1")]).unwrap();
        assert_eq!(r.limit, limited(100, Unit::Hour));
        assert!(r.shadow_mode);
        let r = c.lookup("edge", [("generic_key", "other")]).unwrap();
        assert_eq!(r.limit, limited(1000, Unit::Day));
        let r = c.lookup("edge", [("generic_key", "internal")]).unwrap();
        assert_eq!(r.limit, RuleLimit::Unlimited);
    }

    #[test]
    fn nested_descriptors_use_the_last_entry() {
        let c = cfg();
        let r = c.lookup("edge", [("tenant", "acme"), ("plan", "pro")]).unwrap();
        assert_eq!(r.limit, limited(600, Unit::Minute));
        assert_eq!(r.algorithm, Some(Algorithm::TokenBucket));
        let r = c.lookup("edge", [("tenant", "acme"), ("plan", "free")]).unwrap();
        assert_eq!(r.limit, limited(60, Unit::Minute));
        // The intermediate node has no rate_limit.
        let r = c.lookup("edge", [("tenant", "acme")]).unwrap();
        assert_eq!(r.limit, RuleLimit::None);
    }

    #[test]
    fn unknown_domain_key_or_deeper_descriptor_has_no_rule() {
        let c = cfg();
        assert!(c.lookup("other", [("remote_address", "x")]).is_none());
        assert!(c.lookup("edge", [("nope", "x")]).is_none());
        assert!(c.lookup("edge", [("remote_address", "x"), ("path", "/")]).is_none());
        assert!(c.lookup("edge", []).is_none());
    }

    #[test]
    fn units_parse_case_insensitively_and_map_to_proto() {
        for (s, u, p) in [
            ("second", Unit::Second, 1),
            ("MINUTE", Unit::Minute, 2),
            ("Hour", Unit::Hour, 3),
            ("day", Unit::Day, 4),
            ("month", Unit::Month, 5),
            ("year", Unit::Year, 6),
            ("week", Unit::Week, 7),
        ] {
            assert_eq!(Unit::parse(s), Some(u));
            assert_eq!(u.to_proto(), p);
            assert_eq!(Unit::from_proto(p), Some(u));
        }
        assert_eq!(Unit::from_proto(0), None);
    }

    fn err(yaml: &str) -> String {
        Config::from_yaml("f.yaml", yaml).unwrap_err()
    }

    #[test]
    fn errors_name_the_file_and_place() {
        let e = err(
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: fortnight, requests_per_unit: 1}\n",
        );
        assert!(e.starts_with("f.yaml: "), "{e}");
        assert!(e.contains("unknown unit `fortnight`"), "{e}");
        assert!(e.contains("line 4"), "{e}");

        let e = err("domain: d\ndescriptors:\n  - key: a\n    bogus: 1\n");
        assert!(e.contains("unknown field `bogus`"), "{e}");
        assert!(e.contains("line 4"), "{e}");

        let e = err("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second}\n");
        assert_eq!(e, "f.yaml: descriptors[0].rate_limit.requests_per_unit: missing");

        let e = err("domain: d\ndescriptors:\n  - key: a\n  - key: a\n");
        assert_eq!(e, "f.yaml: descriptors[1]: duplicate descriptor key `a`");

        let e = err("domain: d\ndescriptors:\n  - key: a\n    descriptors:\n      - key: ''\n");
        assert_eq!(e, "f.yaml: descriptors[0].descriptors[0].key: must not be empty");

        let e = err("domain: d\ndescriptors:\n  - key: a\n    algorithm: leaky\n");
        assert!(e.contains("unknown algorithm `leaky`"), "{e}");

        let e = err("domain: ''\n");
        assert_eq!(e, "f.yaml: `domain` must not be empty");

        let e = err("descriptors: []\n");
        assert!(e.contains("missing field `domain`"), "{e}");

        let e = err("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unlimited: true, unit: second}\n");
        assert!(e.contains("cannot have"), "{e}");
    }

    #[test]
    fn several_files_and_directories_load_and_duplicate_domains_are_rejected() {
        let dir = std::env::temp_dir().join(format!("rls-cfg-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), "domain: a\n").unwrap();
        std::fs::write(dir.join("b.yml"), "domain: b\n").unwrap();
        std::fs::write(dir.join("notes.txt"), "not yaml").unwrap();
        let (c, _) = Config::load(std::slice::from_ref(&dir)).unwrap();
        assert_eq!(c.domain_names(), vec!["a".to_string(), "b".to_string()]);
        let e = Config::load(&[dir.clone(), dir.join("a.yaml")]).unwrap_err();
        assert!(e.contains("domain `a` is defined in more than one file"), "{e}");
        let e = Config::load(&[dir.join("missing.yaml")]).unwrap_err();
        assert!(e.contains("missing.yaml"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn fixture(field: &str) -> Config {
        let path =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/upstream/{field}.yaml"));
        Config::load(&[path]).unwrap().0
    }

    #[test]
    fn upstream_fields_that_are_ignored_load_with_a_warning_naming_them() {
        for (field, _) in IGNORED_FIELDS {
            let c = fixture(field);
            assert_eq!(c.domain_names(), vec![field.to_string()]);
            assert_eq!(c.warnings.len(), 1, "{field}: {:?}", c.warnings);
            let w = &c.warnings[0];
            assert!(w.contains(&format!("descriptors[0].{field}: accepted and ignored (")), "{w}");
            assert!(w.starts_with(&format!("{}: ", c.sources[0].display())), "{w}");
        }
    }

    #[test]
    fn replaces_share_threshold_quota_and_shadow_mode_load_without_warnings() {
        let c = fixture("replaces");
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let r = c.lookup("replaces", [("key_2", "value_2"), ("user", "bkthomps")]).unwrap();
        assert_eq!(r.replaces, vec!["specific_limit".to_string()]);
        let r = c.lookup("replaces", [("key_1", "value_1"), ("user", "bkthomps")]).unwrap();
        assert_eq!((r.name.as_str(), r.replaces.len()), ("specific_limit", 0));
        let c = fixture("share_threshold");
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let (_, shared) = c.lookup_shared("share_threshold", [("route", "files/a.pdf")]).unwrap();
        assert_eq!(shared, vec![Some("files/")]);
        let (_, shared) = c.lookup_shared("share_threshold", [("route", "own/x")]).unwrap();
        assert_eq!(shared, vec![None]);
        let c = fixture("quota_mode");
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        assert!(c.lookup("quota_mode", [("daily_quota", "u")]).unwrap().quota_mode);
        assert!(!c.lookup("quota_mode", [("per_user", "u")]).unwrap().quota_mode);
        let c = fixture("shadow_mode");
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        assert!(c.lookup("shadow_mode", [("service", "s"), ("user", "user-a")]).unwrap().shadow_mode);
    }

    #[test]
    fn replaces_entries_are_checked_like_upstream() {
        let e = err("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second, requests_per_unit: 1, replaces: [{name: ''}]}\n");
        assert_eq!(e, "f.yaml: descriptors[0].rate_limit.replaces[0].name: must not be empty");
        let e = err("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {name: x, unit: second, requests_per_unit: 1, replaces: [{name: x}]}\n");
        assert_eq!(
            e,
            "f.yaml: descriptors[0].rate_limit.replaces[0].name: a limit cannot replace itself (`x`)"
        );
        let e = err("domain: d\ndescriptors:\n  - key: a\n    value: b\n    share_threshold: true\n");
        assert_eq!(e, "f.yaml: descriptors[0].share_threshold: only for wildcard values (`value: prefix*`), as in envoyproxy/ratelimit");
        let e = err("domain: d\ndescriptors:\n  - key: a\n    quota_mod: true\n");
        assert!(e.contains("unknown field `quota_mod`"), "{e}");
    }

    #[test]
    fn yaml_1_1_booleans_load_as_in_upstream() {
        // envoyproxy/ratelimit reads its files with YAML 1.1 booleans (yes/no/on/off).
        let c = Config::from_yaml(
            "f.yaml",
            "domain: d\ndescriptors:\n  - key: a\n    shadow_mode: yes\n    rate_limit: {unit: second, requests_per_unit: 1}\n",
        )
        .unwrap();
        assert!(c.lookup("d", [("a", "x")]).unwrap().shadow_mode);
    }

    #[test]
    fn errors_are_one_line() {
        let e = err("domain: d\ndescriptors:\n  - key: a\n   rate_limit: [\n");
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.contains("line 4"), "{e}");
    }

    #[test]
    fn the_shipped_example_loads() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/limits.yaml");
        let (c, _) = Config::load(&[path]).unwrap();
        let r = c.lookup("edge", [("tenant", "t"), ("plan", "pro")]).unwrap();
        assert_eq!(r.limit, limited(1_000_000, Unit::Month));
    }
}
