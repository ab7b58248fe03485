"""Architectures built from the components (kind ``model``); importing registers them."""

from iresflow.models import classifier, flow  # noqa: F401
from iresflow.models.classifier import IResNetClassifier
from iresflow.models.flow import ResidualFlow, standard_normal_log_prob

__all__ = ["IResNetClassifier", "ResidualFlow", "standard_normal_log_prob"]
