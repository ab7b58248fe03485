"""Architectures built from the components (kind ``model``); importing registers them."""

from iresflow.models import classifier, coupling, flow  # noqa: F401
from iresflow.models.classifier import IResNetClassifier
from iresflow.models.coupling import GlowFlow
from iresflow.models.flow import ResidualFlow, standard_normal_log_prob

__all__ = ["GlowFlow", "IResNetClassifier", "ResidualFlow", "standard_normal_log_prob"]
