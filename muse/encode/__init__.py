"""Phase 2: captions -> T5 embeddings, images -> VQ token grids, in Parquet shards + a manifest.

See `shards.py` for the layout and guarantees, `text.py` and `image.py` for the encoders.
"""

from muse.encode.shards import (MANIFEST, EncodeError, dataset_dir, encode_shard, finalize_manifest,
                                plan_encode, run_encode)

__all__ = ["MANIFEST", "EncodeError", "dataset_dir", "encode_shard", "finalize_manifest", "plan_encode",
           "run_encode"]
