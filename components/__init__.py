"""KFP components: typed inputs and outputs, a few lines that call drseg, no logic of their own."""

from drseg import __version__

RUNTIME_IMAGE = f"ghcr.io/drseg/runtime:{__version__}"
"""CPU image with drseg installed (images/runtime.Dockerfile)."""
