"""The presets (``pairsift run demo`` finds ``demo.yaml``) and model configs, shipped inside the package."""

from pathlib import Path

CONFIGS_DIR = Path(__file__).resolve().parent
TINY_MODEL = CONFIGS_DIR / "models" / "tiny-vit.json"  # the tiny CLIP the demo and tests train
