"""The PyTorch + PEFT side of `cargo xtask bench train-step`: the same workload as
`whet bench-step` (same model folder, batch, length, random tokens, LoRA r=16 alpha=32 on all
linear layers or full fine-tuning, AdamW), printed as one JSON line. Never run by CI.

    python3 benches/train_step.py --model DIR --method lora --batch 4 --seq 256 --steps 5
"""
import argparse
import json
import resource
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM


def tokens(batch, seq, vocab):
    state, out = 12345, []
    for _ in range(batch * seq):
        state = (state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        out.append((state >> 33) % vocab)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--method", default="lora", choices=["lora", "full"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--checkpoint", action="store_true", help="gradient checkpointing per layer")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32, attn_implementation="sdpa")
    if a.method == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    if a.checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if a.method == "lora":
            model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.tensor(tokens(a.batch, a.seq, vocab)).view(a.batch, a.seq)
    targets = torch.cat([ids[:, 1:], torch.full((a.batch, 1), -100)], dim=1)
    times, losses = [], []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    mean = sum(times) / len(times)
    print(json.dumps({
        "impl": "pytorch+peft", "torch": torch.__version__, "method": a.method, "batch": a.batch, "seq": a.seq,
        "steps": a.steps, "activation_checkpointing": a.checkpoint, "step_s": mean, "tokens_per_s": a.batch * a.seq / mean,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "losses": losses,
    }))


if __name__ == "__main__":
    main()
