//! `whet export --ollama DIR`: the GGUF and a Modelfile, into a folder whet owns.

use std::fs;

use crate::common::*;

#[test]
fn export_for_ollama_writes_the_gguf_and_a_modelfile() {
    let tmp = Tmp::new("ollama");
    let m = model(&tmp);
    let dir = tmp.join("ollama");
    let export = || {
        whet([
            "export",
            "--model",
            s(&m),
            "--ollama",
            s(&dir),
            "--type",
            "q8_0",
        ])
    };
    let v = export().ok().json();
    assert_eq!(v["tokenizer_round_trip"], true, "{v}");
    assert_eq!(v["ollama"]["template_family"], "chatml", "{v}");
    assert_eq!(
        v["bytes"].as_u64().unwrap(),
        fs::metadata(dir.join("model.gguf")).unwrap().len()
    );
    let text = fs::read_to_string(dir.join("Modelfile")).unwrap();
    assert!(text.contains("\nFROM ./model.gguf\n"), "{text}");
    assert!(
        text.contains("TEMPLATE \"\"\"{{- range .Messages }}<|im_start|>{{ .Role }}\n"),
        "{text}"
    );
    assert!(text.contains("PARAMETER stop \"<|im_end|>\"\n"), "{text}");
    assert!(dir.join(".whet-run").is_file());
    // The folder is whet's: a second export replaces it whole.
    export().ok();
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, [".whet-run", "Modelfile", "model.gguf"]);
    // It reads back as a model (whet's own GGUF import).
    whet([
        "convert",
        "--from-gguf",
        s(&dir.join("model.gguf")),
        "--out",
        s(&tmp.join("back")),
    ])
    .ok();
}

#[test]
fn export_for_ollama_refuses_a_foreign_folder_and_an_unknown_template() {
    let tmp = Tmp::new("ollama-refuse");
    let m = model(&tmp);
    let dir = tmp.join("mine");
    fs::create_dir_all(&dir).unwrap();
    write(&dir.join("notes.txt"), "my notes");
    let r = whet(["export", "--model", s(&m), "--ollama", s(&dir)]).fails();
    assert!(r.stderr.contains("not made by whet"), "{}", r.stderr);
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);

    // A Phi-3 style template: refused before anything is written, naming the template.
    let cfg_path = m.join("tokenizer_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["chat_template"] =
        "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}<|assistant|>\n"
            .into();
    write(&cfg_path, &cfg.to_string());
    let out = tmp.join("new");
    let r = whet(["export", "--model", s(&m), "--ollama", s(&out)]).fails();
    assert!(
        r.stderr.contains("tokenizer_config.json")
            && r.stderr.contains("not one whet translates")
            && r.stderr.contains("<|end|>"),
        "{}",
        r.stderr
    );
    assert!(!out.exists());
    // --gguf or --ollama, one of them.
    let r = whet(["export", "--model", s(&m)]);
    assert!(!r.status.success());
}
