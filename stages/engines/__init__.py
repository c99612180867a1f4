"""Text generation engines for the recaption stages, behind one small interface.

``Engine.generate(prompts, params) -> completions`` (one completion per prompt, same order) is all
the stages use, so the same stage runs on:

- ``transformers``: Hugging Face ``generate`` in left-padded batches, CPU or GPU; small models and
  machines without vLLM (and the tests, with tiny models built in the test);
- ``vllm``: the offline ``vllm.LLM`` engine (continuous batching, prefix caching, tensor parallel,
  images for VLMs); the default on GPU, an optional extra (``pip install -e ".[gpu]"``);
- ``openai``: an OpenAI-compatible HTTP endpoint such as ``vllm serve``, with bounded concurrency,
  timeouts and retries.

Sampling is seeded per prompt (``Prompt.seed``), so a caption's output does not depend on which
other captions share its batch or shard: vLLM and the HTTP API take a per-request seed, and the
transformers engine samples each row with its own generator (Gumbel-max over the warped logits).
A prompt that fails (an undecodable image, an HTTP error after retries) comes back as a completion
with ``finish_reason="error"``: per-row failures are values, never exceptions. Prompt text is tokenized
as text: a caption's ``</s>`` or ``<|im_start|>`` never becomes a control token (``untrusted_text``).
"""

from __future__ import annotations

from pairsift.stages.engines.base import (
    MISSING_TRANSFORMERS,
    MISSING_VLLM,
    Completion,
    Engine,
    EngineConfig,
    Prompt,
    SamplingParams,
    chat_messages,
    cut_at_stop,
    decode_image,
    image_data_url,
    prompt_seed,
)
from pairsift.stages.engines.http import OpenAIEngine
from pairsift.stages.engines.local import SeededSampling, TransformersEngine, VllmEngine, import_vllm

__all__ = [
    "MISSING_TRANSFORMERS", "MISSING_VLLM", "Completion", "Engine", "EngineConfig",
    "OpenAIEngine", "Prompt", "SamplingParams", "SeededSampling", "TransformersEngine", "VllmEngine",
    "chat_messages", "cut_at_stop", "decode_image", "image_data_url", "import_vllm", "make_engine",
    "prompt_seed",
]


def make_engine(cfg: EngineConfig) -> Engine:
    if cfg.backend == "vllm":
        return VllmEngine(cfg)
    if cfg.backend == "openai":
        return OpenAIEngine(cfg)
    return TransformersEngine(cfg)
