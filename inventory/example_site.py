"""Example site inventory: copy to ``inventory/<site>.py`` and edit.

    pyinfra inventory/example_site.py deploy.py

Groups carry their data inline here; ``inventory/group_data/<group>.py`` adds
more (pyinfra loads that folder for every inventory file in this directory).
Section dicts (``llama_server``, ``llama_limits``, ...) are deep-merged:
all → group → host, most specific wins per key.
"""

# from the catalog (Hugging Face, downloaded once by the controller, pushed to every host)
_model = {"catalog": "gemma-2-2b-it", "alias": "gemma-2-2b-it"}

# one bearer key for the site, in a 0600 file on the controller (never in this file):
#   llamadeploy key new secrets/example-site-api-key            (rotate: add --rotate, deploy)
_server = {"api_key_file": "secrets/example-site-api-key"}

# Small CPU nodes: the user's example limits (4 CPUs / 8 GB, 2 CPUs / 4 GB reserved)
cpu_nodes = (
    [
        "llm-01.example.internal",
        ("llm-02.example.internal", {"llama_server": {"port": 8081}}),
    ],
    {
        "llama_model": _model,
        "llama_server": _server,
        "llama_limits": {"cpus": 4.0, "memory": "8G", "memory_reserved": "4G"},
    },
)

# A bigger box: more slots and context, model pinned in RAM
big_nodes = (
    ["llm-10.example.internal"],
    {
        "llama_model": {"catalog": "qwen2.5-3b", "alias": "qwen2.5-3b"},
        "llama_server": {**_server, "parallel": 16, "ctx_size": 131072, "load_mode": "mlock"},
    },
)
