"""llamadeploy: put llama.cpp's llama-server on your own hosts with pyinfra.

The package is the reusable core that ``deploy.py`` and ``roles/`` build on:

* :mod:`llamadeploy.config`  the one pydantic model holding every setting
* :mod:`llamadeploy.facts`   what we read from a host (``FactBase`` subclasses)
* :mod:`llamadeploy.tuning`  pure functions from config + facts to server flags
* :mod:`llamadeploy.operations` the few operations pyinfra has no stock op for
"""
