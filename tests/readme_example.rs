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

#[test]
fn every_filter_configuration_in_the_readme_is_accepted() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    // A block ends at the first line that is only a fence (indented too, inside a list item).
    let blocks: Vec<String> = readme
        .split("```json\n")
        .skip(1)
        .map(|rest| rest.lines().take_while(|line| line.trim() != "```").collect::<Vec<_>>().join("\n"))
        .filter(|block| block.trim_start().starts_with('{') && block.contains("\"rules\""))
        .collect();
    assert!(blocks.len() >= 2, "the README's filter configurations were not found");
    for block in blocks {
        if let Err(e) = Config::parse(block.as_bytes()) {
            panic!("{e}\nin:\n{block}");
        }
    }
}
