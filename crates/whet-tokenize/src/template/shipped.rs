//! The chat templates whet ships (`templates/`, embedded): for base models whose
//! `tokenizer_config.json` has none. `templates/README.md` says where each comes from.

/// Every shipped template: its name and its text.
pub const SHIPPED: [(&str, &str); 5] = [
    ("chatml", include_str!("../../templates/chatml.jinja")),
    ("llama3", include_str!("../../templates/llama3.jinja")),
    ("gemma", include_str!("../../templates/gemma.jinja")),
    ("zephyr", include_str!("../../templates/zephyr.jinja")),
    ("phi3", include_str!("../../templates/phi3.jinja")),
];

/// The text of the shipped template `name`.
pub fn shipped(name: &str) -> Option<&'static str> {
    SHIPPED.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// The shipped names, comma-separated, for error messages.
pub fn names() -> String {
    SHIPPED.map(|(n, _)| n).join(", ")
}
