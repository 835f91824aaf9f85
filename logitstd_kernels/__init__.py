"""logitstd-kernels: fused kernels for logit-standardized knowledge distillation.

Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024. See docs/design.md for the
math and README.md for the API.
"""

from . import reference
from ._backends import available_backends, backend_status
from .config import DistillConfig
from .ctkd import CTKDTemperature, GradientReversal, cosine_lambda, gradient_reversal
from .functional import kd_loss, logitstd_kd_loss, zscore
from .fused_linear import default_chunk_size, fused_linear_distillation_loss
from .methods import DKDLoss, dkd_loss
from .mlkd import MLKDLoss, mlkd_loss
from .modules import DistillationLoss, FusedLinearDistillationLoss, LogitStdKDLoss
from .objective import DistillationParts, distillation_loss
from .sparse import SparseTeacher

__version__ = "0.1.0"

__all__ = [
    "CTKDTemperature",
    "GradientReversal",
    "cosine_lambda",
    "gradient_reversal",
    "DKDLoss",
    "DistillConfig",
    "DistillationLoss",
    "DistillationParts",
    "FusedLinearDistillationLoss",
    "LogitStdKDLoss",
    "MLKDLoss",
    "SparseTeacher",
    "available_backends",
    "backend_status",
    "default_chunk_size",
    "distillation_loss",
    "dkd_loss",
    "fused_linear_distillation_loss",
    "kd_loss",
    "logitstd_kd_loss",
    "mlkd_loss",
    "reference",
    "zscore",
    "__version__",
]
