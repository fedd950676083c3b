"""Scaffolding for tests, the demo and the benches: small worlds and models made on the spot.

Nothing here is needed to run the pipeline on real data; it lets the whole pipeline run
offline on a CPU and still show that it learns:
- `shapes`: a learnable tiny world (coloured shapes with captions) and its deterministic
  prompt-adherence scorer;
- `shapes_vq`: a diffusers `VQModel` trained briefly on that world, cached per machine;
- `tiny`: tiny random-init encoders (T5, VQ, Paella, CLIP, FID features) saved like the real ones;
- `gcs`: `GCSEmulator`, a real fake-gcs-server on 127.0.0.1;
- `gcs_faults`: `GCSFaultProxy`, a proxy in front of it that injects what real GCS does under load
  (429/503, resets, stalls, short and changed bodies) by a seeded schedule, and counts requests;
- `imageserver`: `ImageServer`, a real HTTP server of generated images and failure routes
  (or of a folder's files, for the demo);
- `image_shards`: `write_image_shard`, phase-1 shards written directly for the encode tests;
- `demo`: the demo (`make demo`, `flows/demo.py`): the shapes world through the whole pipeline,
  scored, and its `muse eval` metric;
- `faults`: the trainer's fault injection (NaN steps, a per-step trace, a pause), run as
  `python -m muse.testing.faults` in place of `python -m muse.train`.
"""
