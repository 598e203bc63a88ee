"""The PyTorch + PEFT side of whet's GPU training-step bench (`benches/benches/cuda_step.rs`):
the same LoRA step on the same device, printed as one JSON line per model. Never run by CI;
`run.sh benches` of the `cargo xtask cuda-build` bundle runs it after whet's bench.

Same workload: SmolLM2-135M-shaped and Llama-3.2-1B-shaped models with random weights
(transformers' init), batch 4 x 2048 random tokens, LoRA r=16 alpha=32 dropout 0 on every
linear layer (PEFT keeps the adapters in f32 on a bf16 base, as whet does), AdamW lr 1e-4,
bf16 weights and compute, SDPA attention, the loss over the next-token targets.

    python3 benches/train_step_gpu.py [--model smollm2-135m|llama-1b|all] [--batch 4] [--seq 2048]
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                     tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001),
}


def tokens(n, vocab):
    state, out = 12345, []
    for _ in range(n):
        state = (state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        out.append((state >> 33) % vocab)
    return out


def run(name, batch, seq, steps, warmup, compile_model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated()
    cfg = LlamaConfig(**SHAPES[name], attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules="all-linear"))
    if compile_model:
        model = torch.compile(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.tensor(tokens(batch * seq, cfg.vocab_size), device="cuda").view(batch, seq)
    targets = torch.cat([ids[:, 1:], torch.full((batch, 1), -100, device="cuda")], dim=1)
    losses = []
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / steps
    return {
        "impl": "pytorch+peft", "torch": torch.__version__, "model": name, "batch": batch,
        "seq": seq, "tokens_per_s": batch * seq / step_s,
        "peak_gpu_mib": (torch.cuda.max_memory_allocated() - base_mem) / 2**20,
        "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20,
        "first_loss": losses[0], "compiled": compile_model,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="all", choices=["all", *SHAPES])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model too")
    a = ap.parse_args()
    for name in SHAPES if a.model == "all" else [a.model]:
        print(json.dumps(run(name, a.batch, a.seq, a.steps, a.warmup, a.compile)), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
