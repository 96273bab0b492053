"""
setuptools entry point.

The twistd plugin lives in ``twisted/plugins`` (no ``__init__.py`` there) and
is shipped as the ``twisted.plugins`` package: ``pip install .`` puts
``infsmtp_plugin.py`` beside Twisted's own plugins, where ``twistd`` looks.

``package_dir={"": "."}`` is for ``pip install -e .``: Twisted finds plugins
by scanning ``sys.path`` for ``twisted/plugins`` folders, but for a flat
layout setuptools' editable install uses an import hook that leaves the
project folder off ``sys.path``, so ``twistd`` would not see the plugin.
Naming the project folder as the package root makes the editable install a
plain ``.pth`` entry for it (what ``setup.py develop`` always did).  That
never shadows Twisted: ``twisted/`` here has no ``__init__.py``, so it is at
most a namespace portion, and Twisted's regular package wins wherever it
sits on ``sys.path``.
"""

from setuptools import setup

setup(
    package_dir={"": "."},
    packages=["infsmtp", "infsmtp._server", "infsmtp._client", "infsmtp._daemon", "infsmtp.testing", "twisted.plugins"],
    package_data={"twisted.plugins": ["infsmtp_plugin.py"]},
)
