"""Jinja2 templates, one folder per role (``service/``, ``docker/``).

A package only so that ``importlib.resources`` finds them in the wheel, where
setuptools maps this folder to ``llamadeploy.templates``.
"""
