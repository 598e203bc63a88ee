use std::path::Path;

/// Every shipped recipe parses, validates, and points at data that exists.
#[test]
fn every_recipe_is_a_valid_config() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let cfg = whet::config::Config::load(&path, &[])
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            cfg.data.train.is_file(),
            "{}: {} is missing",
            path.display(),
            cfg.data.train.display()
        );
        if let Some(v) = &cfg.data.validation {
            assert!(
                v.is_file(),
                "{}: {} is missing",
                path.display(),
                v.display()
            );
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with('#') && text.contains("whet train --config")
                || text.contains("cargo xtask train"),
            "{}: the header comment gives the command",
            path.display()
        );
        seen += 1;
    }
    assert!(seen >= 5, "recipes for each method: found {seen}");
}
