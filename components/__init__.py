"""KFP components: typed inputs and outputs, a few lines that call drseg, no logic of their own.

Each step's settings travel as one JSON string of its typed settings section (validated
by pydantic inside the component), so the pipeline signature stays small and KFP's cache
keys on every setting. Credentials and the tracking server come from the environment
(Kubernetes Secrets on a cluster), never from parameters.
"""

from drseg.config import ClusterSettings

_DEFAULT = ClusterSettings()
# The images a component is declared with; the pipeline replaces the registry and tag with
# cluster.image_registry and cluster.image_tag when it is built (pipelines/training.py).

RUNTIME_IMAGE = _DEFAULT.image("runtime")
"""CPU image with drseg installed (images/runtime.Dockerfile)."""

TRAINER_IMAGE = _DEFAULT.image("trainer")
"""CUDA PyTorch image with drseg installed (images/trainer.Dockerfile)."""

TENSORRT_IMAGE = _DEFAULT.image("tensorrt")
"""NVIDIA's TensorRT image with drseg installed (images/tensorrt.Dockerfile)."""
