"""The example plugins, installed as the package ``iresflow._plugins`` (``iresflow._plugins.groupsort``, ...).

Discovery imports every module here whose name does not start with ``_`` (see ``README.md``); this
file only makes the folder a package, so that the plugins have stable importable names.
"""
