"""lstream: LLM inference that streams quantized weights to the GPU and computes the rest on the CPU.

    import lstream
    model = lstream.load("smollm2-135m", n_gpu_layers=0, policy=lstream.BatchThreshold(64))
    print(model.generate("The capital of France is", n_predict=16, temp=0))
"""
from .core.benchmark import bench  # noqa: F401
from .api import Model, load  # noqa: F401
from .core.errors import LStreamError, ModelFormatError  # noqa: F401
from .core.policy import Always, BatchThreshold, Calibration, CostModel, LayerSplit, Never, UploadPolicy  # noqa: F401
from .core.sampling import Sampler, SamplerConfig  # noqa: F401

__version__ = "0.1.0"
