"""Tiny causal LMs built in the test (no downloads): a byte-level BPE tokenizer trained with
``tokenizers`` and a small ``LlamaForCausalLM``, randomly initialised or trained for a few hundred
steps on a synthetic caption-rewrite corpus. head_dim is 64 (hidden 128, 2 heads): vLLM's CPU
attention refuses smaller heads.

Imported by file path (``load_helper``) from the main venv's tests and run inside ``.venv-vllm`` by
``run_rewrite.py``: a ``tests/vllm`` package would shadow the real ``vllm`` on ``sys.path``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from pathlib import Path

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star"]
CAPTION_TEMPLATES = [
    "a {c} {s} on a white background",
    "{c} {s} icon",
    "drawing of a {c} {s}",
    "simple {c} {s}",
]
REWRITE_TEMPLATES = [
    "a white background with a {c} {s} on it",
    "an illustration of a {c} {s}",
    "a plain {s} painted {c}",
    "a {c} {s} shape drawn on white",
]


def synthetic_pair(rng: random.Random) -> tuple[str, str, str, str]:
    """(caption, rewrite, colour, shape): a rewrite says the same colour and shape in other words."""
    c, s = rng.choice(COLOURS), rng.choice(SHAPES)
    return (
        rng.choice(CAPTION_TEMPLATES).format(c=c, s=s),
        rng.choice(REWRITE_TEMPLATES).format(c=c, s=s),
        c,
        s,
    )


def write_examples(path: Path, n: int = 16, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = ["# synthetic in-context examples for the tiny test LM"]
    lines += ["{} => {}".format(*synthetic_pair(rng)[:2]) for _ in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def build_tiny_lm(out: Path, corpus: Iterable[str], vocab_size: int = 700, seed: int = 0) -> Path:
    """A randomly initialised tiny Llama + a BPE tokenizer trained on ``corpus``, saved to ``out``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(list(corpus), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def train_tiny_lm(
    model_dir: Path, texts: list[str], steps: int = 300, batch: int = 16, seed: int = 0
) -> Path:
    """Next-token training on ``texts`` (each ends with EOS); saves the weights back to ``model_dir``."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        chunk = [t + tokenizer.eos_token for t in rng.sample(texts, batch)]
        enc = tokenizer(chunk, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    model.save_pretrained(model_dir)
    return model_dir


def rewrite_corpus(prompt_for: Callable[[str, str, int], str], n: int, seed: int = 1) -> list[str]:
    """Training texts in the exact prompt format of the rewrite stage, each completed with a rewrite."""
    rng = random.Random(seed)
    texts = []
    for index in range(n):
        caption, rewrite, _, _ = synthetic_pair(rng)
        texts.append(prompt_for(caption, f"train{index}", index % 4) + rewrite + '"')
    return texts


LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}USER: {% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% else %}<image>\n{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tiny_llava(out: Path, corpus: Iterable[str], vocab_size: int = 500, seed: int = 0) -> Path:
    """A randomly initialised tiny LLaVA (CLIP vision tower 32 px, patch 8 -> 16 image tokens) + processor."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(list(corpus), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    fast.chat_template = LLAVA_CHAT_TEMPLATE
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=fast,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=32,
            patch_size=8,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=64,
        ),
        text_config=LlamaConfig(
            vocab_size=len(fast),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=fast.bos_token_id,
            eos_token_id=fast.eos_token_id,
            pad_token_id=fast.pad_token_id,
        ),
        image_token_id=fast.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
