//! The complete example in the README is a configuration the filter accepts.

use ratelimit_wasm::config::Config;

#[test]
fn the_readme_complete_example_is_a_valid_configuration() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = &readme[readme.find("## Configuration").unwrap()..];
    let start = section.find("```json\n{").unwrap() + "```json\n".len();
    let end = start + section[start..].find("\n```").unwrap();
    let config = Config::parse(&section.as_bytes()[start..end]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.rules.len(), 7);
    assert!(config.rules.iter().any(|r| r.shadow));
}
