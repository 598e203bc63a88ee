//! `cargo run -p lora-loop --release [MODEL_DIR]`: fine-tunes LoRA adapters on a few sentences
//! with a loop of its own (see `lib.rs`) and prints the loss of each step. Without an argument
//! it uses the tiny model under `fixtures/tiny_chat`; any Hugging Face Llama-family folder works
//! (`cargo xtask fetch-model` downloads SmolLM2-135M-Instruct).

fn main() -> lora_loop::Result<()> {
    let model = std::env::args_os()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(lora_loop::tiny_model);
    let losses = lora_loop::fine_tune(&model, &lora_loop::TEXTS, 12, 0.5)?;
    for (step, loss) in losses.iter().enumerate() {
        println!("step {:>2}  loss {loss:.4}", step + 1);
    }
    Ok(())
}
