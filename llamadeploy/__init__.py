"""llamadeploy: put llama.cpp's llama-server on your own hosts with pyinfra.

* :mod:`llamadeploy.deploy`   the whole deploy as one importable ``@deploy``
* :mod:`llamadeploy.roles`    one folder per feature (the top-level ``roles/``)
* :mod:`llamadeploy.config`   the one pydantic model holding every setting
* :mod:`llamadeploy.hostdata` pyinfra host data into that model, every host at once
* :mod:`llamadeploy.tuning`   pure functions from config + facts to server flags
* :mod:`llamadeploy.manifest` what a host was given, written and read in one place
* :mod:`llamadeploy.cli`      the ``llamadeploy`` command (sandbox, status, bench, key)
"""
