"""The toy world of infinity-textual-inversion: a procedural world of coloured shapes, the small
models that learn it, and the recogniser that scores a learned concept.

- `toy_infinity.world`: the world (objects, captions, held-out concepts) rendered from a seed.
- `toy_infinity.tiny`: tiny T5 encoders and tiny random Infinity models, for the tests, the
  benchmarks and the toy model's pretraining (examples/pretrain_toy_infinity.py).
- `toy_infinity.recogniser`: a small CNN that names an image's kind and colour; the fidelity score.
- `toy_infinity.fidelity`: textual inversion on a held-out concept, before and after, as the
  benchmark and the tests run it.
"""
