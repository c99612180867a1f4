"""Run ``open_clip_train.main`` with our model-config JSONs registered (a test and benchmark helper).

    python tests/trainer/open_clip_train_shim.py configs/models/tiny-vit.json -- --model tiny-vit ...

Two things stand between pairsift's environment and open_clip_train, neither about the shards:
- open_clip_train only knows model configs in open_clip's own folder: we register ours first
  (``open_clip.add_model_config``), as the trainer does.
- open_clip_train 3.3.0's ``group_by_keys_nothrow`` expects webdataset <= 0.2.86 (its ``[training]``
  extra pins that); webdataset 0.2.111, which img2dataset resolves to here, ends every shard with an
  empty end-of-shard marker that function cannot read (KeyError: 'fname'). We turn the marker off.
"""

from __future__ import annotations

import functools
import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def main(argv: list[str]) -> int:
    split = argv.index("--")
    import open_clip

    for path in argv[:split]:
        open_clip.add_model_config(path)
    import webdataset.tariterators as wds_tar
    from open_clip_train import data as oct_data
    from open_clip_train.main import main as oct_main

    oct_data.tar_file_expander = functools.partial(wds_tar.tar_file_expander, eof_value=None)
    return oct_main(argv[split + 1:]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
