"""Functions the ``pairsift`` typer CLI mounts for ``train`` and ``eval``; thin shells over trainer code.

User mistakes raise ``trainer.config.ConfigError`` (a ``ValueError``) with a one-line message.
``python -m pairsift.trainer.cli train CONFIG [--resume] [key=value ...]`` and
``python -m pairsift.trainer.cli eval CHECKPOINT DATA [--out FILE]`` work without the pipeline CLI.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def train_command(config: Path, resume: bool = False, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train from a YAML config with ``key.sub=value`` overrides; returns the TrainResult as a dict."""
    from dataclasses import asdict

    from pairsift.trainer.config import load_config, parse_overrides
    from pairsift.trainer.train import train

    cfg = load_config(config, parse_overrides(overrides))
    result = train(cfg, resume=resume)
    return asdict(result)


def eval_command(checkpoint: Path, data: Path, out: Path | None = None) -> dict[str, Any]:
    """Evaluate a trained checkpoint directory on a held-out set; prints a table, writes JSON to ``out``."""
    from pairsift.trainer.eval import evaluate_checkpoint, format_table

    result = evaluate_checkpoint(checkpoint, data, out)
    print(format_table(result))
    return result


def main(argv: list[str] | None = None) -> int:
    from pairsift.trainer.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m pairsift.trainer.cli train CONFIG [--resume] [key=value ...] | eval CHECKPOINT DATA [--out F]"
    try:
        if argv[:1] == ["train"] and len(argv) >= 2:
            rest = argv[2:]
            train_command(Path(argv[1]), "--resume" in rest, [a for a in rest if a != "--resume"])
        elif argv[:1] == ["eval"] and len(argv) >= 3:
            out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else None
            result = eval_command(Path(argv[1]), Path(argv[2]), out)
            if out is None:
                print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}))
        else:
            print(usage, file=sys.stderr)
            return 2
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
