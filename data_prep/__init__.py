"""Dataset release -> WebDataset shard converters (``medclip-prep``).

One module per release (``roco``, ``rocov2``, ``medicat``, ``pmc_oa``, ``medmnist``, ``generic`` for CSV/JSONL/image
folders, ``demo`` for the generated demo set); ``writer`` writes shards, ``manifest.json``, ``sizes.json`` and
``rejected.jsonl`` for all of them; ``images`` opens, converts, resizes and encodes images safely; ``records`` holds
what a converter yields and the checks every record passes; ``cli`` is the command line.
"""
