"""The model zoo: RepLKNet (Ding et al., CVPR 2022), the comparison models of its paper, and its large-kernel
successors UniRepLKNet (CVPR 2024) and SLaK (ICLR 2023)."""
from erf_lab.models.registry import create_model, is_model, list_models, register_model
from erf_lab.models.reparam import reparameterize_model

# Importing the architecture modules registers their variants.
from erf_lab.models import replknet  # noqa: F401,E402
from erf_lab.models import resnet  # noqa: F401,E402
from erf_lab.models import mobilenetv2  # noqa: F401,E402
from erf_lab.models import efficientnet_lite  # noqa: F401,E402
from erf_lab.models import unireplknet  # noqa: F401,E402
from erf_lab.models import slak  # noqa: F401,E402
# ... and the deploy layout that create_model(..., deploy=True) merges a training-time checkpoint into
from erf_lab.models import deploy  # noqa: F401,E402

__all__ = ["create_model", "list_models", "register_model", "is_model", "reparameterize_model"]
