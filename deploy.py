"""Deploy llama.cpp's llama-server: ``pyinfra inventory/<site>.py deploy.py``.

The table of contents (each step is a role under ``roles/``; every setting is a
field of ``llamadeploy.config.HostConfig``):

1. validate every host of the inventory          ``llamadeploy.hostdata``
   (hosts with llama_role "front" get HAProxy     ``roles/front``,
   and "monitor" Prometheus, and stop there)      ``roles/monitor``
2. resolve, fetch and verify the model            ``roles/model``
   (several, llama_models: one router, a preset)  ``roles/router``
3. preflight: memory plan, slots, context, port   ``roles/preflight``
   paths and account the deploy did not create     ``roles/ownership``
   are refused; what it creates is recorded
4. build llama.cpp (native) or engine + image     ``roles/build``, ``roles/docker``
   (hosts with llama_role "rpc_worker" then run    ``roles/rpc``
   ggml-rpc-server for their head, and stop there)
5. model files on the host, sha256-verified       ``roles/model``
6. nftables rules for the port (optional)         ``roles/firewall``
7. systemd unit or compose file, restart on change ``roles/service``, ``roles/docker``
8. health gate: /health, one chat completion      ``roles/health``
   (a release that fails it: the one that served  ``roles/release``
   before is reinstated, and the run fails)
9. record the release, prune old ones             ``roles/release``

Steps 1-3 run while pyinfra prepares the run, so nothing changes on any host
unless every host passes them. The steps themselves are one importable
``@deploy``, :func:`llamadeploy.deploy.llama_server`, for reuse in other deploys.
"""

from llamadeploy.deploy import llama_server

llama_server()
