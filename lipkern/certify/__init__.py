"""Certificates: margin radii from Lipschitz bounds (LMT / LipLT), certified accuracy, randomized smoothing
(Cohen et al. 2019) and SPLITZ (noise after the left half, local Lipschitz bound of that half).

Every radius is a guarantee: margin radii for the exact-arithmetic network at the given logits (see
:mod:`lipkern.certify.margin` about the logits' rounding), smoothing and SPLITZ radii with probability ≥ 1 − α
over the Monte Carlo noise.
"""

from lipkern.certify.margin import (CertifiedAccuracy, certified_accuracy, certified_radius,
                                    lln_pairwise_lipschitz)
from lipkern.certify.rounding import OneLipschitz, register_lipschitz_proof, register_rounding_rule
from lipkern.certify.smoothing import ABSTAIN, RandomizedSmoothing, clopper_pearson_lower, smoothing_radius
from lipkern.certify.splitz import (GaussianNoise, LocalLipschitzEstimate, LocalReluLipschitz, SplitzCertifier,
                                    splitz_loss, splitz_regularizer)

__all__ = ["ABSTAIN", "CertifiedAccuracy", "GaussianNoise", "LocalLipschitzEstimate", "LocalReluLipschitz",
           "OneLipschitz", "RandomizedSmoothing", "SplitzCertifier", "certified_accuracy", "certified_radius",
           "clopper_pearson_lower", "lln_pairwise_lipschitz", "register_lipschitz_proof", "register_rounding_rule",
           "smoothing_radius", "splitz_loss", "splitz_regularizer"]
