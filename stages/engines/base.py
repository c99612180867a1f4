"""What every engine shares: prompts, sampling parameters, completions, the config and the interface.

The engines themselves are in ``local.py`` (transformers, vLLM: the model runs in this process)
and ``http.py`` (an OpenAI-compatible endpoint).
"""

from __future__ import annotations

import base64
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MISSING_VLLM = 'engine backend "vllm" needs the vllm package: pip install -e ".[gpu]"'
MISSING_TRANSFORMERS = 'engine backend "transformers" needs transformers: pip install -e ".[recaption]"'


@dataclass(frozen=True)
class Prompt:
    text: str
    image: bytes | None = None  # encoded image (JPEG/PNG/WebP) for a VLM; sent as a chat message
    seed: int | None = None  # per-prompt sampling seed; None = derived from the engine seed and position


@dataclass(frozen=True)
class SamplingParams:
    # Always explicit: vLLM's default of 16 tokens silently cuts captions.
    max_tokens: int
    temperature: float = 0.9
    top_p: float = 0.95
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string), "length" (hit max_tokens) or "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class EngineConfig(BaseModel):
    """Which model runs where. One config type for all backends; each reads the keys it needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    backend: Literal["transformers", "vllm", "openai"] = "transformers"
    model: str  # local directory or a name the machine can fetch; for "openai" the served model name
    # Wrap text prompts in the model's chat template (instruct models). Image prompts always are.
    chat: bool = False
    dtype: str = "auto"  # "auto": bfloat16 on GPU, float32 on CPU
    device: str = "auto"  # transformers only: "auto", "cpu", "cuda", "cuda:1" ...
    batch_size: int = Field(32, ge=1)  # transformers: rows per generate(); vllm: max_num_seqs
    seed: int = 0
    # vllm
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    vllm_kwargs: dict[str, Any] = Field(default_factory=dict)  # passed to vllm.LLM as is
    # openai
    base_url: str | None = None  # e.g. http://127.0.0.1:8000/v1
    api_key_env: str | None = None  # name of the environment variable holding the key, never the key
    concurrency: int = Field(16, ge=1)
    timeout_s: float = Field(120.0, gt=0)
    retries: int = Field(3, ge=0)

    @model_validator(mode="after")
    def _check_endpoint(self) -> EngineConfig:
        endpoint = self.base_url or ""
        if self.backend == "openai" and not endpoint.startswith(("http://", "https://")):
            raise ValueError('engine backend "openai" needs base_url, e.g. http://127.0.0.1:8000/v1')
        return self


class Engine(ABC):
    @abstractmethod
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Completion]:
        """One completion per prompt, in order."""


def prompt_seed(base: int, index: int, prompt: Prompt) -> int:
    return prompt.seed if prompt.seed is not None else (base * 1_000_003 + index) % 2**63


def image_data_url(image: bytes) -> str:
    """A data: URL for encoded image bytes (the MIME type sniffed from the magic number)."""
    mime = "image/png" if image[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
    if image[:4] == b"RIFF" and image[8:12] == b"WEBP":
        mime = "image/webp"
    return f"data:{mime};base64,{base64.b64encode(image).decode()}"


def chat_messages(prompt: Prompt) -> list[dict[str, Any]]:
    """The OpenAI-style user message for a prompt: text, plus the image first when there is one."""
    if prompt.image is None:
        return [{"role": "user", "content": prompt.text}]
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(prompt.image)}},
                {"type": "text", "text": prompt.text},
            ],
        }
    ]


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Text up to the earliest stop string (excluded, as vLLM does) and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


# What PIL raises for truncated, corrupt, unsupported or oversized (decompression bomb) files.
IMAGE_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, SyntaxError, EOFError)


def decode_image(data: bytes | None) -> tuple[Any, str | None]:
    from PIL import Image

    from pairsift.common.images import open_image

    if data is None:
        return None, "no_image"
    try:
        with open_image(data) as image:
            return image.convert("RGB"), None
    except (
        *IMAGE_ERRORS,
        Image.DecompressionBombError,
    ) as exc:  # a decoder failure is this row's problem, not the batch's
        return None, f"decode_error: {type(exc).__name__}"
