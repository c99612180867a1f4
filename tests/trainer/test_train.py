"""Training end to end on CPU: it learns, it exports open_clip's format, it resumes exactly."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from synth_shards import REPO, tiny_config, write_shards

from pairsift.trainer.config import ConfigError, build_config, load_config
from pairsift.trainer.train import TrainResult, train


def _weights(final_dir: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(final_dir) / "open_clip_model.safetensors"))


def test_tiny_model_learns_zero_shot_and_exports_open_clip_local_dir(corpus, tmp_path):
    import open_clip

    from pairsift.trainer.cli import eval_command
    from pairsift.trainer.eval import evaluate
    from pairsift.trainer.train import train_on_shards

    # the demo's call: shard dir, steps, batch → <out>/final
    result = train_on_shards(corpus / "train", tmp_path / "run", steps=120, batch_size=64, eval_data=corpus,
                             warmup=12, threads=1, progress=False, eval={"every": 60})
    ev = result.eval
    history = [json.loads(x) for x in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [60, 120] and history[1]["top1"] == ev["top1"]
    assert ev["classes"] == 12 and ev["samples"] == 600
    assert ev["top1"] >= 0.40, ev["top1"]  # chance is 0.083; measured 0.63–0.65 over 3 seeds
    assert ev["top5"] > ev["top1"]
    assert ev["i2t_r1"] > 3 / 60  # 60 distinct test captions: chance is 1/60
    assert len(ev["per_class"]) == 12 and min(ev["per_class_count"].values()) > 20
    per_class_mean = sum(ev["per_class"][c] * ev["per_class_count"][c] for c in ev["per_class"]) / 600
    assert per_class_mean == pytest.approx(ev["top1"], abs=1e-6)
    assert result.losses[-1] < result.losses[0] - 1.0
    assert result.steps == 120 and result.samples_seen == 120 * 64

    # the export is open_clip's own local-dir format: open_clip loads it with no pairsift code
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{result.final_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{result.final_dir}")
    reloaded = evaluate(model, preprocess, tokenizer, corpus / "test")
    assert reloaded["top1"] == pytest.approx(ev["top1"], abs=1e-6)
    cfg_json = json.loads((Path(result.final_dir) / "open_clip_config.json").read_text())
    assert set(cfg_json) >= {"model_cfg", "preprocess_cfg"} and cfg_json["model_cfg"]["embed_dim"] == 64

    out = tmp_path / "eval.json"
    via_cli = eval_command(Path(result.final_dir), corpus, out)
    assert json.loads(out.read_text())["top1"] == pytest.approx(via_cli["top1"]) == pytest.approx(ev["top1"])


def test_resume_after_kill_matches_the_uninterrupted_run(corpus, tmp_path):
    common = {"steps": 30, "checkpoint_every": 10, "keep_checkpoints": 2}
    straight = train(build_config(tiny_config(tmp_path / "straight", corpus / "train", **common)))

    cfg_file = tmp_path / "cut.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_config(tmp_path / "cut", corpus / "train", **common)))
    log = tmp_path / "cut" / "log.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "pairsift.trainer.cli", "train", str(cfg_file)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:  # kill it somewhere past step 15
            if log.is_file() and any(json.loads(x)["step"] >= 15 for x in log.read_text().splitlines()):
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not (tmp_path / "cut" / "final").exists()
    ckpts = sorted((tmp_path / "cut" / "checkpoints").glob("step-*.pt"))
    assert ckpts and ckpts[-1].name in ("step-0000010.pt", "step-0000020.pt")
    state = torch.load(ckpts[-1], weights_only=True)  # tensors and primitives only
    assert set(state) >= {"model", "optimizer", "rng", "cursors", "step", "scaler", "scheduler"}

    with pytest.raises(ConfigError, match="resume"):  # a fresh start must not mix with old checkpoints
        train(load_config(cfg_file))
    resumed = train(load_config(cfg_file), resume=True)
    assert len(resumed.losses) == 30
    assert max(abs(a - b) for a, b in zip(straight.losses, resumed.losses)) < 1e-5
    wa, wb = _weights(straight.final_dir), _weights(resumed.final_dir)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5
    assert TrainResult.load(tmp_path / "cut").losses == resumed.losses


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_gradient_accumulation_is_exact_for_contrastive_losses(corpus, tmp_path, loss):
    """Cached-feature accumulation: 2 × 16 gives the same steps as one batch of 32."""
    runs = {}
    for accum in (1, 2):
        cfg = build_config(tiny_config(tmp_path / f"{loss}-{accum}", corpus / "train", steps=4, loss=loss,
                                       accum_steps=accum, data={"train": str(corpus / "train"), "readers": 2}))
        runs[accum] = train(cfg)
    assert runs[1].losses[-1] < runs[1].losses[0]
    assert max(abs(a - b) for a, b in zip(runs[1].losses, runs[2].losses)) < 1e-4
    wa, wb = _weights(runs[1].final_dir), _weights(runs[2].final_dir)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4
    if loss == "siglip":
        assert "logit_bias" in wa
        assert json.loads((Path(runs[1].final_dir) / "open_clip_config.json").read_text())[
            "model_cfg"]["init_logit_bias"] == -10.0


def test_checkpoints_and_results_never_write_through_a_planted_link(corpus, tmp_path):
    """The output dir may be shared: links planted at the old fixed temp names (``<name>.tmp``) of the
    checkpoint, the config and the result point at a victim file, which must stay as it was."""
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    planted = [out / "checkpoints" / "step-0000002.pt.tmp", out / "result.json.tmp", out / "train-config.json.tmp"]
    for link in planted:
        link.symlink_to(victim)
    result = train(build_config(tiny_config(out, corpus / "train", steps=2)))
    assert victim.read_text() == "precious" and all(link.is_symlink() for link in planted)
    assert (out / "checkpoints" / "step-0000002.pt").is_file() and json.loads((out / "result.json").read_text())
    assert result.steps == 2
    leftovers = [p.name for p in out.rglob("*.tmp") if not p.is_symlink()]
    assert leftovers == []


def test_gradient_checkpointing_changes_memory_not_results(corpus, tmp_path):
    runs = [train(build_config(tiny_config(tmp_path / f"gc-{on}", corpus / "train", steps=3,
                                           grad_checkpointing=on))) for on in (False, True)]
    assert max(abs(a - b) for a, b in zip(runs[0].losses, runs[1].losses)) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_trains_on_gpu(corpus, tmp_path):
    result = train(build_config(tiny_config(tmp_path / "gpu", corpus / "train", steps=20, precision="bf16",
                                            device="cuda", batch_size=64)))
    assert result.losses[-1] < result.losses[0]
    assert (tmp_path / "gpu" / "final" / "open_clip_model.safetensors").is_file()


def test_autocast_on_cpu_is_a_config_error(corpus, tmp_path):
    with pytest.raises(ConfigError, match="needs a GPU"):
        train(build_config(tiny_config(tmp_path / "bf", corpus / "train", precision="bf16", device="cpu")))


def test_config_errors_are_one_line(tmp_path):
    base = tiny_config(tmp_path / "x", tmp_path)
    with pytest.raises(ConfigError, match=r"^train config: batchsize: Extra inputs are not permitted$"):
        build_config({**base, "batchsize": 3})
    with pytest.raises(ConfigError, match="exactly one of 'steps' or 'epochs'"):
        build_config({**base, "epochs": 2})
    cfg = build_config(base, {"data.workers": 2, "loss": "siglip"})
    assert cfg.data.workers == 2 and cfg.loss == "siglip"
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    one_sample = {"train": str(write_shards(tmp_path / "one", 1, 1))}  # the data is checked first
    with pytest.raises(ConfigError, match="unknown open_clip model"):
        train(build_config({**base, "model": "no-such-model", "data": one_sample}))


def test_every_shipped_train_config_validates():
    configs = sorted((REPO / "configs" / "train").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


def test_trainer_never_imports_pipeline_or_stages():
    for path in sorted((REPO / "trainer").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in ("pipeline", "stages"), f"{path.name} imports {name}"


def _cli(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_training_on_undecodable_shards_fails_fast_with_one_line(tmp_path, capsys):
    """Every image corrupt: the trainer CLI stops at the first batch with exit 1 and one line
    saying why (one pass over the data, not two), before any step is logged or checkpointed."""
    from pairsift.trainer.cli import main

    write_shards(tmp_path / "bad", 60, 30, seed=9, corrupt_every=1)
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_config(tmp_path / "out", tmp_path / "bad", steps=50)))
    assert main(["train", str(cfg_file), "data.workers=1"]) == 1  # the reader runs in a DataLoader worker
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: no usable training sample (reader 0 of 1: its 2 shard(s) of data.train hold "
                      "60 samples, every one skipped: 60 decode_error); check the shards"]
    assert not (tmp_path / "out" / "log.jsonl").exists()
    assert not list((tmp_path / "out").glob("checkpoints/*.pt")) and not (tmp_path / "out" / "final").exists()


def test_training_on_empty_shards_fails_before_the_model_loads(tmp_path):
    """Shards without a sample: `pairsift train` (a real process) exits 2 with one line, before it
    builds the model."""
    import tarfile

    empty = tmp_path / "empty"
    empty.mkdir()
    for name in ("00000.tar", "00001.tar"):
        tarfile.open(empty / name, "w").close()  # no sizes.json: the tars themselves are counted
    cfg_file = tmp_path / "empty.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_config(tmp_path / "out", empty)))
    proc = _cli(["pipeline", "train", str(cfg_file)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: no training samples: the 2 shard(s) of data.train ({empty}) are empty; point data.train at "
        "the shards a pipeline run wrote (<run>/shards)"]  # nothing else: not even open_clip's model warning
    assert not (tmp_path / "out").exists()
