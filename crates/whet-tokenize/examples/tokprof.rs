use std::time::Instant;
use tokenizers::PreTokenizer;
fn main() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/templates/smollm2");
    let tok = whet_tokenize::Tokenizer::from_dir(&dir).unwrap();
    let words = ["the","model","learns","every","token","of","raw","text","and","a","tokenizer","splits","into","pieces","packing","places","several","short","documents","in","one","row","café","мир","日本語","🚀","2024","42"];
    let mut s = 1u64; let mut docs = Vec::new(); let mut total = 0;
    while total < (2<<20) { let mut d = String::new(); while d.len() < 2000 { s ^= s<<13; s^= s>>7; s^= s<<17; d.push_str(words[(s % words.len() as u64) as usize]); d.push(if s % 9 == 0 {'.'} else {' '}); } total += d.len(); docs.push(d); }
    let mb = total as f64 / 1e6;
    for _ in 0..2 {
    let t = Instant::now(); let mut n = 0; for d in &docs { n += tok.inner().encode_fast(d.as_str(), false).unwrap().len(); } let e = t.elapsed().as_secs_f64(); println!("encode_fast {:.2} MB/s ({} tokens)", mb/e, n);
    let t = Instant::now(); for d in &docs { let _ = tok.inner().encode(d.as_str(), false).unwrap(); } let e = t.elapsed().as_secs_f64(); println!("encode {:.2} MB/s", mb/e);
    let pt = tok.inner().get_pre_tokenizer().unwrap();
    let t = Instant::now(); for d in &docs { let mut p = tokenizers::PreTokenizedString::from(d.as_str()); pt.pre_tokenize(&mut p).unwrap(); } let e = t.elapsed().as_secs_f64(); println!("pretokenize only {:.2} MB/s", mb/e);
    let exs: Vec<whet_data::Example> = docs.iter().enumerate().map(|(i,d)| whet_data::Example{id: i as u64, origin: whet_data::Origin{file: "x".into(), row: i as u64}, record: whet_data::Record::Text{text: d.clone()}}).collect();
    let cfg = whet_tokenize::TokenizeConfig{max_len: Some(2048), parallel: false, ..Default::default()};
    let t = Instant::now(); let (out, _) = tok.tokenize_examples(&exs, &cfg).unwrap(); let e = t.elapsed().as_secs_f64(); println!("tokenize_examples {:.2} MB/s", mb/e);
    let pc = whet_tokenize::PackConfig{seq_len: 2048, pad_id: 0, truncation: whet_tokenize::Truncation::Right, bos_id: None};
    let t = Instant::now(); let _ = whet_tokenize::pack(&out, &pc).unwrap(); let e = t.elapsed().as_secs_f64(); println!("pack {:.2} MB/s", mb/e);
    }
}
