"""`whet data prepare` against Hugging Face `datasets` + `tokenizers` on the same corpus.

Generates a JSONL corpus of `--mb` megabytes (many documents of a few KB, a few of several MB on
one line), then, alternating, tokenizes it with

- whet: `whet data prepare --data corpus.jsonl --model DIR --out store` (streamed, all cores);
- HF: `load_dataset("json")` then `Dataset.map(batched=True, num_proc=2)` with the same
  `tokenizer.json` (`tokenizers.Tokenizer.encode_batch`), a fresh datasets cache each run;

and prints each side's wall time, MB/s of input and peak RSS (`/usr/bin/time -v`, children
included), and their ratio. Run it at two sizes to see whether RSS grows with the corpus:

    /opt/whet-py/bin/python benches/prepare.py --whet target/release/whet \
        --model ~/.cache/whet/models/smollm2-135m-instruct/hf --mb 200 --work /tmp/prep-bench
"""

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile

HF = r"""
import sys, time
from datasets import load_dataset
from tokenizers import Tokenizer
import pyarrow.compute as pc
corpus, tokenizer_json, cache = sys.argv[1:4]
tok = Tokenizer.from_file(tokenizer_json)
ds = load_dataset("json", data_files=corpus, split="train", cache_dir=cache)
def enc(batch):
    return {"input_ids": [e.ids for e in tok.encode_batch(batch["text"])]}
out = ds.map(enc, batched=True, num_proc=2, remove_columns=["text"])
# Counted in Arrow: a Python list of every token id would need more memory than the map did.
print("tokens", pc.sum(pc.list_value_length(out.data.column("input_ids"))).as_py())
"""


def corpus(path, mb, seed=0):
    rng = random.Random(seed)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(5000)
    ]
    target = mb * 1_000_000
    written = 0
    long_every = max(1, target // (4 * 5_000_000))
    with open(path, "w") as f:
        n = 0
        while written < target:
            n += 1
            k = rng.randint(5_000_000, 6_000_000) if n % 997 == 0 and n // 997 <= long_every else int(rng.lognormvariate(7.5, 1.0))
            text = []
            size = 0
            while size < k:
                w = rng.choice(words)
                text.append(w)
                size += len(w) + 1
            line = json.dumps({"text": " ".join(text)}) + "\n"
            f.write(line)
            written += len(line)
    return written


def timed(cmd, env=None):
    res = subprocess.run(
        ["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True, env=env
    )
    if res.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{res.stdout}\n{res.stderr}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", res.stderr).group(1)
    parts = [float(p) for p in wall.split(":")]
    secs = parts[-1] + 60 * parts[-2] + (3600 * parts[-3] if len(parts) == 3 else 0)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    return secs, rss / 1024, res.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--whet", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--work", default=tempfile.gettempdir() + "/whet-prepare-bench")
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    path = os.path.join(a.work, f"corpus-{a.mb}mb.jsonl")
    if not os.path.exists(path):
        corpus(path, a.mb)
    size = os.path.getsize(path) / 1e6
    cpu = next(l for l in open("/proc/cpuinfo") if l.startswith("model name")).split(":")[1].strip()
    print(f"corpus {size:.0f} MB, {os.cpu_count()} cores ({cpu})")
    rows = []
    for r in range(a.rounds):
        store = os.path.join(a.work, "store")
        w_s, w_rss, w_out = timed([a.whet, "data", "prepare", "--data", path, "--model", a.model, "--out", store, "--max-len", "2048"])
        w_tokens = json.load(open(os.path.join(store, "prepare.json")))["tokens"]
        cache = os.path.join(a.work, "hf-cache")
        shutil.rmtree(cache, ignore_errors=True)
        h_s, h_rss, h_out = timed([sys.executable, "-c", HF, path, os.path.join(a.model, "tokenizer.json"), cache])
        h_tokens = int(h_out.split()[-1])
        shutil.rmtree(cache, ignore_errors=True)
        rows.append((w_s, w_rss, w_tokens, h_s, h_rss, h_tokens))
        print(
            f"round {r}: whet {w_s:.1f} s ({size / w_s:.1f} MB/s, peak RSS {w_rss:.0f} MiB, {w_tokens} tokens); "
            f"HF datasets {h_s:.1f} s ({size / h_s:.1f} MB/s, peak RSS {h_rss:.0f} MiB, {h_tokens} tokens); "
            f"throughput ratio whet/HF {h_s / w_s:.2f}x"
        )


if __name__ == "__main__":
    main()
