"""Phase 2: captions -> T5 embeddings, images -> VQ token grids, in Parquet shards + a manifest.

See `shards.py` for the pipeline and guarantees, `text.py` and `image.py` for the encoders,
`muse/layout.py` for the file names and schemas.
"""

from muse.encode.shards import EncodeError, encode_shard, finalize_manifest, plan_encode, run_encode

__all__ = ["EncodeError", "encode_shard", "finalize_manifest", "plan_encode", "run_encode"]
