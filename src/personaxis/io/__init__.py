"""The I/O layer: every file personaxis reads or writes.

- :mod:`personaxis.io.run_layout`: the run directory — one object that knows every path of it, and typed records
  (pydantic) for its JSON files (manifest, rollouts, judgments, vector index, summary);
- :mod:`personaxis.io.tensor_files`: our safetensors formats for the axis and capping configs, and reading a run's
  vectors and activations into tensors;
- :mod:`personaxis.interop` (beside this package, for its public name): the reference implementation's ``.pt``
  formats and llama.cpp's GGUF control vectors;
- :mod:`personaxis.store`: atomic writes, the run lock and the manifest check.

The layer imports the method's core (``axis``, ``capping``, ``vectors``, …) and never the reverse.
"""
