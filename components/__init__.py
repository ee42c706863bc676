"""KFP components: typed inputs and outputs, a few lines that call drseg, no logic of their own.

Each step's settings travel as one JSON string of its typed settings section (validated
by pydantic inside the component), so the pipeline signature stays small and KFP's cache
keys on every setting. Credentials and the tracking server come from the environment
(Kubernetes Secrets on a cluster), never from parameters.
"""

from drseg import __version__

RUNTIME_IMAGE = f"ghcr.io/drseg/runtime:{__version__}"
"""CPU image with drseg installed (images/runtime.Dockerfile)."""

TRAINER_IMAGE = f"ghcr.io/drseg/trainer:{__version__}"
"""CUDA PyTorch image with drseg installed (images/trainer.Dockerfile)."""

TENSORRT_IMAGE = f"ghcr.io/drseg/tensorrt:{__version__}"
"""NVIDIA's TensorRT image with drseg installed (images/tensorrt.Dockerfile)."""
