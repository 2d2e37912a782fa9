"""The roles, one folder per feature, like Ansible roles.

Each folder holds the feature's ``@deploy`` functions (``__init__.py``), its own
operations (``operations.py``) and facts (``facts.py``); its templates sit in
``templates/<role>/``. In an installed wheel this folder is ``llamadeploy.roles``.
:func:`llamadeploy.deploy.llama_server` composes them in order.

* ``model``      resolve, fetch and verify the GGUF files; put them on the host
* ``preflight``  refuse a host whose memory cannot hold model + KV cache; size slots
* ``build``      compile a pinned llama.cpp release on the host (native mode)
* ``service``    user, key, manifest, hardened systemd unit (native mode)
* ``docker``     engine, image, compose file (docker mode)
* ``health``     the gate after a (re)start
"""
