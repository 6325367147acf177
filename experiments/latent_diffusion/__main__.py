"""`python -m experiments.latent_diffusion`: see the package docstring."""

import sys

from experiments.latent_diffusion import main

sys.exit(main())
