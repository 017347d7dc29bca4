"""lipkern: fused Triton and CUDA kernels for certifiably robust, Lipschitz-constrained networks."""

from lipkern import bounds, certify, losses, models, nn, ops
from lipkern._cpu_kernels import available as cpu_kernels_available
from lipkern._cuda import available as cuda_extension_available
from lipkern._dispatch import BackendUnavailableError, config, configure, reload_config, select_backend

__version__ = "0.1.0"
__all__ = ["bounds", "certify", "losses", "models", "nn", "ops", "cuda_extension_available",
           "cpu_kernels_available", "select_backend",
           "BackendUnavailableError", "config", "configure", "reload_config", "__version__"]
