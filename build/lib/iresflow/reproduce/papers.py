"""The numbers the papers report, to print beside ours (never used in a computation).

Sources: i-ResNet (Behrmann et al. 2019, arXiv 1811.00995), Residual Flows (Chen et al. 2019,
arXiv 1906.02735), i-DenseNets (Perugachi-Diaz et al. 2021). The i-ResNet bits/dim (MNIST 1.06,
CIFAR-10 3.45) were confirmed against the paper's listing on paperswithcode; the other values
are as recalled by the project lead and are marked so until checked against the papers' tables.
"""

from __future__ import annotations

CHECK_NOTE = ("values as reported in the papers (i-ResNet bits/dim confirmed; the others as recalled, "
              "to be checked against the papers' tables)")

#: i-ResNet Table 2: classification error (%) on MNIST / CIFAR10 / CIFAR100; None: not reported
CLASSIFICATION_ERROR = {
    "source": "Behrmann et al. 2019 (i-ResNet), Table 2",
    "columns": ["MNIST", "CIFAR10", "CIFAR100"],
    "rows": {
        "ResNet-164": [None, 5.50, 24.30],
        "Vanilla": [0.38, 6.69, 23.97],
        "c=0.9": [0.40, 6.78, 24.58],
        "c=0.8": [0.42, 6.86, 24.99],
        "c=0.7": [0.40, 6.93, 25.99],
        "c=0.6": [0.42, 7.72, 27.30],
        "c=0.5": [0.86, 8.71, 29.45],
    },
}

#: bits/dim on MNIST / CIFAR10 (i-ResNet Table 4, Residual Flows Table 1, i-DenseNets)
DENSITY_BPD = {
    "source": "Behrmann et al. 2019 (i-ResNet) Table 4; Chen et al. 2019 (Residual Flows) Table 1; "
              "Perugachi-Diaz et al. 2021 (i-DenseNets)",
    "columns": ["MNIST", "CIFAR10"],
    "rows": {
        "Real NVP": [1.06, 3.49],
        "Glow": [1.05, 3.35],
        "FFJORD": [0.99, 3.40],
        "i-ResNet": [1.06, 3.45],
        "Residual Flow": [0.97, 3.28],
        "i-DenseNet": [None, 3.25],
    },
}
