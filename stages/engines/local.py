"""Engines that run the model in this process: Hugging Face transformers and offline vLLM."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

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
    prompt_seed,
)
from pairsift.stages.untrusted_text import defuse, prompt_ids, special_strings


class TransformersEngine(Engine):
    """Batched ``generate`` with left padding; VLMs (config with a vision tower) through their processor."""

    def __init__(self, cfg: EngineConfig):
        try:
            import torch
            import transformers
        except ImportError:
            raise ValueError(MISSING_TRANSFORMERS) from None
        self.cfg = cfg
        self.torch = torch
        self.device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = _torch_dtype(torch, cfg.dtype, self.device)
        model_cfg = transformers.AutoConfig.from_pretrained(cfg.model)
        self.is_vlm = getattr(model_cfg, "vision_config", None) is not None
        if self.is_vlm:
            self.processor = transformers.AutoProcessor.from_pretrained(cfg.model)
            self.tokenizer = self.processor.tokenizer
            model_class = transformers.AutoModelForImageTextToText
        else:
            self.processor = None
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.model)
            model_class = transformers.AutoModelForCausalLM
        self.tokenizer.padding_side = "left"  # decoder-only batches must end where generation starts
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model_class.from_pretrained(cfg.model, dtype=dtype).to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        self.end_ids = {i for i in [*eos_ids, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id]}
        self.end_ids.discard(None)

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Completion]:
        results: list[Completion | None] = [None] * len(prompts)
        # Similar lengths in one batch waste less padding; results go back to the caller's order.
        order = sorted(
            range(len(prompts)), key=lambda i: (prompts[i].image is not None, len(prompts[i].text))
        )
        size = self.cfg.batch_size
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            seeds = [prompt_seed(self.cfg.seed, i, prompts[i]) for i in chunk]
            for i, completion in zip(chunk, self._generate_batch([prompts[i] for i in chunk], seeds, params)):
                results[i] = completion
        return [r for r in results if r is not None]

    def _render(self, prompt: Prompt) -> str:
        if prompt.image is None and not self.cfg.chat:
            return prompt.text
        if prompt.image is None:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt.text}], add_generation_prompt=True, tokenize=False
            )
        content = [{"type": "image"}, {"type": "text", "text": prompt.text}]
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )

    def _encode(self, prompts: list[Prompt]) -> tuple[Any, list[str | None]]:
        """Model inputs for the batch, and a per-row error (undecodable image) or None."""
        if not any(p.image is not None for p in prompts):
            ids = [prompt_ids(self.tokenizer, p.text, self.cfg.chat) for p in prompts]
            return self.tokenizer.pad({"input_ids": ids}, return_tensors="pt", padding=True), [None] * len(prompts)
        # The processor tokenizes the rendered text itself, counting <image> tokens: defuse the text.
        specials = special_strings(self.tokenizer)
        texts = [self._render(replace(p, text=defuse(p.text, specials))) for p in prompts]
        from PIL import Image

        images, errors = [], []
        for p in prompts:
            if p.image is None:  # a text-only row in a VLM batch: no <image> in its text either
                errors.append(None)
                continue
            image, error = decode_image(p.image)
            # An undecodable image keeps the batch's shape with a blank stand-in; its output is discarded.
            images.append(image if image is not None else Image.new("RGB", (32, 32)))
            errors.append(error)
        inputs = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
        return inputs, errors

    def _generate_batch(
        self, prompts: list[Prompt], seeds: list[int], params: SamplingParams
    ) -> list[Completion]:
        import transformers

        torch = self.torch
        inputs, errors = self._encode(prompts)
        inputs = inputs.to(self.device)
        config = transformers.GenerationConfig(
            max_new_tokens=params.max_tokens,
            do_sample=False,  # sampling happens in SeededSampling; greedy then takes its argmax
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=sorted(self.end_ids),
            stop_strings=list(params.stop) or None,
        )
        sampler = SeededSampling(seeds, params.temperature, params.top_p, self.device)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                generation_config=config,
                logits_processor=transformers.LogitsProcessorList([sampler]),
                tokenizer=self.tokenizer,
            )
        prompt_len = inputs["input_ids"].shape[1]
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        new_tokens = out[:, prompt_len:].tolist()
        return [
            self._completion(row, int(n), params, error)
            for row, n, error in zip(new_tokens, prompt_tokens, errors)
        ]

    def _completion(
        self, row: list[int], prompt_tokens: int, params: SamplingParams, error: str | None
    ) -> Completion:
        if error is not None:
            return Completion("", "error", prompt_tokens, 0, error)
        # A row that finished early is filled with pad (= often EOS): it ends at the first end id.
        used = next((k for k, t in enumerate(row) if t in self.end_ids), len(row))
        text = self.tokenizer.decode(row[:used], skip_special_tokens=True)
        text, stopped = cut_at_stop(text, params.stop)
        finished = stopped or used < len(row)
        return Completion(text, "stop" if finished else "length", prompt_tokens, used)


class SeededSampling:
    """Temperature + top-p sampling with one RNG per row, as a logits processor for greedy decoding.

    Adding Gumbel noise to the warped logits and taking the argmax draws exactly from the warped
    distribution (Gumbel-max), and with a generator per row a row's draws do not depend on the
    other rows of its batch. Temperature 0 leaves the logits alone: plain greedy decoding.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device: str):
        import torch

        self.torch = torch
        self.temperature = temperature
        self.top_p = top_p
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        torch = self.torch
        if self.temperature <= 0:
            return scores
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            logits = _top_p_mask(torch, logits, self.top_p)
        uniform = torch.stack(
            [torch.rand(logits.shape[1], generator=g, device=logits.device) for g in self.generators]
        )
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1.0 - 1e-7)))
        return logits + gumbel


def _top_p_mask(torch: Any, logits: Any, top_p: float) -> Any:
    """Keep the smallest set of tokens whose probability mass reaches top_p (always at least one)."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token
    drop = drop_sorted.scatter(1, sorted_idx, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _torch_dtype(torch: Any, name: str, device: str) -> Any:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return getattr(torch, name)
    except AttributeError:
        raise ValueError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16") from None


# ------------------------------------------------------------------------------------------------ vLLM


def import_vllm() -> Any:
    """The vllm module, or a one-line error naming the extra to install."""
    try:
        import vllm
    except ImportError:
        raise ValueError(MISSING_VLLM) from None
    if not hasattr(vllm, "LLM"):  # a stray directory named vllm on sys.path imports as an empty namespace
        raise ValueError(MISSING_VLLM)
    return vllm


class VllmEngine(Engine):
    """The offline ``vllm.LLM`` engine. Text prompts go to ``generate``; chat and image prompts to ``chat``."""

    def __init__(self, cfg: EngineConfig):
        # One engine lives inside one worker/actor: its processes talk over loopback. Unset, vLLM
        # finds "its" address by connecting a UDP socket towards 8.8.8.8 and binds to the network.
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
        os.environ.setdefault("VLLM_LOOPBACK_IP", "127.0.0.1")
        vllm = import_vllm()
        self.cfg = cfg
        self.vllm = vllm
        kwargs: dict[str, Any] = {
            "model": cfg.model,
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "enable_prefix_caching": cfg.enable_prefix_caching,
            "max_num_seqs": cfg.batch_size,
            "gpu_memory_utilization": cfg.gpu_memory_utilization,
            "enforce_eager": cfg.enforce_eager,
            "dtype": cfg.dtype,
            "seed": cfg.seed,
        }
        if cfg.max_model_len is not None:
            kwargs["max_model_len"] = cfg.max_model_len
        if _vllm_on_cpu():
            # vLLM 0.32's CPU runner crashes ("CPU Generator does not use offset") when a seeded
            # request's prefill is split across steps: keep every prefill whole there.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(cfg.max_model_len or 8192, 8192)
        if cfg.tensor_parallel_size > 1:
            # Worker processes on the GPUs Ray gave this actor, not a nested Ray placement.
            kwargs["distributed_executor_backend"] = "mp"
        kwargs.update(cfg.vllm_kwargs)
        self.llm = vllm.LLM(**kwargs)

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Completion]:
        sampling = [
            self.vllm.SamplingParams(
                n=1,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_tokens,
                stop=list(params.stop) or None,
                seed=prompt_seed(self.cfg.seed, i, p),
            )
            for i, p in enumerate(prompts)
        ]
        results: list[Completion | None] = [None] * len(prompts)
        # Text prompts go as token ids we encoded (the text as text, the chat markup as markup);
        # image prompts through vLLM's chat, which tokenizes itself, with their text defused.
        tokenizer = self.llm.get_tokenizer()
        texts = [i for i, p in enumerate(prompts) if p.image is None]
        images = [i for i, p in enumerate(prompts) if p.image is not None]
        if texts:
            token_prompts = [{"prompt_token_ids": prompt_ids(tokenizer, prompts[i].text, self.cfg.chat)}
                             for i in texts]
            outs = self.llm.generate(token_prompts, [sampling[i] for i in texts], use_tqdm=False)
            for i, out in zip(texts, outs):
                results[i] = _vllm_completion(out)
        if images:
            specials = special_strings(tokenizer)
            convs = [chat_messages(replace(prompts[i], text=defuse(prompts[i].text, specials))) for i in images]
            outs = self.llm.chat(convs, [sampling[i] for i in images], use_tqdm=False)
            for i, out in zip(images, outs):
                results[i] = _vllm_completion(out)
        return [r for r in results if r is not None]


def _vllm_on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _vllm_completion(out: Any) -> Completion:
    best = out.outputs[0]
    reason = best.finish_reason if best.finish_reason in ("stop", "length") else "error"
    return Completion(
        text=best.text,
        finish_reason=reason,
        prompt_tokens=len(out.prompt_token_ids or []),
        completion_tokens=len(best.token_ids),
        error=None if reason != "error" else f"vllm finish_reason={best.finish_reason}",
    )
