"""Diagnostics: gradient checks (finite differences in both modes, the adjoint identity) and the
generalized-gradient disagreement detector."""

from .generalized import GeneralizedCheck as GeneralizedCheck
from .generalized import check_generalized as check_generalized
from .gradcheck import Comparison, GradcheckError, GradcheckReport, check_adjoint, check_grad

__all__ = [
    "Comparison",
    "GeneralizedCheck",
    "GradcheckError",
    "GradcheckReport",
    "check_adjoint",
    "check_generalized",
    "check_grad",
]
