"""Experiments, one module each: `python -m experiments.<name> --workdir DIR [--config.KEY=VALUE]`."""

import sys

if sys.argv[:1] == ["-m"]:  # being launched as `python -m experiments.<name>`, not imported
  from multimodal_jax.launch import maybe_reexec_with_tcmalloc

  maybe_reexec_with_tcmalloc()
