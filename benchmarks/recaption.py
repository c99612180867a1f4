"""Caption generation throughput: vLLM engine vs transformers engine vs a naive per-batch ``generate``.

Same model, same LaCLIP rewrite prompts (built by the ``rewrite`` stage from the default examples),
same sampling (temperature 0.9, top-p 0.95, max_tokens 64, no stop strings so every engine writes
comparable lengths), one run. Reports generated tokens/s and captions/s per engine.

  naive         model.generate(do_sample=True) over left-padded batches: the baseline
  transformers  our TransformersEngine (per-row seeded sampling, length-sorted batches)
  vllm          our VllmEngine (vllm.LLM; continuous batching), only where vllm imports

Without --model a random Llama (head_dim 64) and a BPE tokenizer are built here: nothing downloads.
vLLM is not in the main venv; run with the vLLM venv to get all three:
  VLLM_TARGET_DEVICE=cpu .venv-vllm/bin/python benchmarks/recaption.py
  .venv/bin/python benchmarks/recaption.py            # naive vs transformers only
The RESULT ratio is vllm / naive when vLLM ran, else transformers / naive.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_model(out: Path, hidden: int, layers: int, corpus: list[str]) -> Path:
    """A random Llama (head_dim 64, as vLLM's CPU attention needs) with a BPE tokenizer trained on ``corpus``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=1024,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    fast.save_pretrained(out)
    return out


def rewrite_prompts(n: int) -> list[str]:
    """n LaCLIP prompts for web-style captions, exactly as the rewrite stage writes them."""
    from pairsift.stages.engines import EngineConfig
    from pairsift.stages.rewrite import Rewrite, RewriteConfig

    stage = Rewrite(RewriteConfig(engine=EngineConfig(model="unused")))
    rng = random.Random(0)
    things = [
        "red bicycle",
        "golden retriever",
        "ceramic mug",
        "mountain lake",
        "city skyline",
        "bowl of soup",
    ]
    places = ["on a white background", "at sunset", "in the park", "for sale", "close-up", "in winter"]
    return [
        stage.prompt(f"{rng.choice(things)} {rng.choice(places)} {i}", f"{i:032x}", 0, 0).text
        for i in range(n)
    ]


def naive_generate(
    model_dir: str, prompts: list[str], batch: int, max_tokens: int, device: str
) -> tuple[int, float]:
    """The baseline: plain transformers sampling, batch after batch, left padded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()

    def run(chunk: list[str]) -> int:
        enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
        with torch.inference_mode():
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=0.9,
                top_p=0.95,
                top_k=0,
                max_new_tokens=max_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[:, enc["input_ids"].shape[1] :]
        return int((new != tokenizer.pad_token_id).sum())

    run(prompts[:2])  # warm-up
    began = time.perf_counter()
    tokens = sum(run(prompts[i : i + batch]) for i in range(0, len(prompts), batch))
    return tokens, time.perf_counter() - began


def engine_generate(cfg, prompts: list[str], max_tokens: int) -> tuple[int, float]:
    from pairsift.stages.engines import Prompt, SamplingParams, make_engine

    engine = make_engine(cfg)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.9, top_p=0.95)
    engine.generate([Prompt(p, seed=i) for i, p in enumerate(prompts[:2])], params)  # warm-up
    began = time.perf_counter()
    out = engine.generate([Prompt(p, seed=i) for i, p in enumerate(prompts)], params)
    seconds = time.perf_counter() - began
    return sum(c.completion_tokens for c in out), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="local model directory (default: a random Llama built here)")
    parser.add_argument("--hidden", type=int, default=256, help="built model width (a multiple of 64)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64, help="transformers batch / vLLM max_num_seqs")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()

    import torch

    from pairsift.stages.engines import EngineConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    device_name = torch.cuda.get_device_name(0).replace(" ", "_") if cuda else "cpu"
    if not cuda:
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    prompts = rewrite_prompts(args.prompts)
    tmp = tempfile.TemporaryDirectory()
    model = args.model or str(build_model(Path(tmp.name) / "model", args.hidden, args.layers, prompts))
    dtype = "bfloat16" if cuda else "float32"

    rows: dict[str, tuple[int, float]] = {}
    rows["naive"] = naive_generate(model, prompts, args.batch, args.max_tokens, device)
    rows["transformers"] = engine_generate(
        EngineConfig(model=model, batch_size=args.batch, device=device, dtype=dtype), prompts, args.max_tokens
    )
    try:
        from pairsift.stages.engines import import_vllm

        import_vllm()
        vllm_cfg = EngineConfig(
            backend="vllm",
            model=model,
            batch_size=args.batch,
            dtype=dtype,
            max_model_len=1024,
            enforce_eager=not cuda,
            gpu_memory_utilization=0.5 if cuda else 0.1,
        )
        rows["vllm"] = engine_generate(vllm_cfg, prompts, args.max_tokens)
    except ValueError as exc:
        print(f"vllm engine skipped: {exc}")

    print(
        f"\n{len(prompts)} rewrite prompts, max_tokens {args.max_tokens}, batch {args.batch}, "
        f"model {'built ' + str(args.hidden) + 'x' + str(args.layers) if not args.model else args.model}, "
        f"device {device_name}, torch threads {torch.get_num_threads()}"
    )
    print(f"{'engine':<14}{'new tokens':>12}{'seconds':>10}{'tokens/s':>12}{'captions/s':>12}")
    rates = {}
    for name, (tokens, seconds) in rows.items():
        rates[name] = (tokens / seconds, len(prompts) / seconds)
        print(f"{name:<14}{tokens:>12}{seconds:>10.2f}{rates[name][0]:>12.0f}{rates[name][1]:>12.1f}")
    ours = "vllm" if "vllm" in rates else "transformers"
    ratio = rates[ours][0] / rates["naive"][0]
    extra = " ".join(
        f"{name}_tokens_per_s={r[0]:.0f} {name}_captions_per_s={r[1]:.1f}" for name, r in rates.items()
    )
    print(f"RESULT name=recaption ratio={ratio:.2f} ours={ours} baseline=naive {extra} device={device_name}")
    tmp.cleanup()


if __name__ == "__main__":  # vLLM spawns worker processes: nothing may run at import
    main()
