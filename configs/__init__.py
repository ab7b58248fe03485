"""The shipped configs: ``train.yaml`` and its groups, installed as the package ``iresflow._configs``.

Nothing here is code; the file makes the folder a package so that ``importlib.resources`` finds
the YAML files in a wheel and in an editable install alike (see ``iresflow/resources.py``).
"""
