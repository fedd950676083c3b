"""Scaffolding for tests, the demo and the benches: small worlds and models made on the spot.

Nothing here is needed to run the pipeline on real data; it lets the whole pipeline run
offline on a CPU and still show that it learns:
- `shapes`: a learnable tiny world (coloured shapes with captions) and its deterministic
  prompt-adherence scorer;
- `shapes_vq`: a diffusers `VQModel` trained briefly on that world, cached per machine.
"""
