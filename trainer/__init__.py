"""The bundled contrastive trainer and its evaluation.

Reads webdataset shards only (never ``pipeline`` or ``stages``). Modules: ``config`` (YAML → pydantic),
``data`` (deterministic, resumable shard stream), ``model`` (open_clip models, local-dir export),
``loss`` (open_clip's CLIP/SigLIP losses, exact accumulation), ``train`` (the loop and launchers),
``eval`` (zero-shot and retrieval), ``cli`` (functions the ``pairsift`` CLI mounts).
Importing this package is cheap; torch loads with the submodules that need it.
"""
