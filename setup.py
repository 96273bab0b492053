"""
setuptools entry point.  The twistd plugin lives in ``twisted/plugins`` (a
namespace without ``__init__.py``) and is shipped as package data of the
``twisted.plugins`` namespace so that ``twistd --help`` finds it after both
``pip install .`` and ``pip install -e .``.
"""

from setuptools import setup

setup(
    packages=["infsmtp", "twisted.plugins"],
    package_data={"twisted.plugins": ["infsmtp_plugin.py"]},
)
