"""Example RAG backend: chat, embeddings and a reranker behind one address per host (router mode).

    pyinfra inventory/rag.py deploy.py

One llama-server per host runs as a router (docs/router.md): it routes each request by its
``model`` to that model's own instance. The chat model loads at startup; the embedding model and
the reranker load at their first request, and at most ``models_max`` models are loaded at once
(the least recently used one is unloaded). The deploy refuses a model set whose largest
``models_max`` models do not fit the memory limit together, with the numbers.

Clients use one base URL and choose the model by name:
    client.chat.completions.create(model="chat", ...)
    client.embeddings.create(model="embed", input=[...])
    POST /v1/rerank {"model": "rerank", "query": ..., "documents": [...]}
"""

_server = {"api_key_file": "secrets/rag-api-key"}  # llamadeploy key new secrets/rag-api-key

_models = [
    # the user's recommended chat model, from the catalog
    {"catalog": "qwen2.5-3b", "alias": "chat", "kind": "chat", "ctx_size": 16384, "parallel": 4},
    # any GGUF embedding model on the Hub, pinned to a commit at deploy time and sha256-verified
    {"repo_id": "nomic-ai/nomic-embed-text-v1.5-GGUF", "filename": "nomic-embed-text-v1.5.Q8_0.gguf",
     "alias": "embed", "kind": "embedding", "pooling": "mean", "load": "on_demand", "parallel": 8},
    # a cross-encoder reranker: --rerank needs rank pooling
    {"repo_id": "gpustack/bge-reranker-v2-m3-GGUF", "filename": "bge-reranker-v2-m3-Q8_0.gguf",
     "alias": "rerank", "kind": "rerank", "pooling": "rank", "load": "on_demand", "parallel": 4},
]

rag_nodes = (
    ["rag-01.example.internal", "rag-02.example.internal"],
    {
        "llama_models": _models,
        "llama_router": {"models_max": 3, "sleep_idle_seconds": 1800},
        "llama_server": _server,
        "llama_limits": {"cpus": 8.0, "memory": "16G", "memory_reserved": "8G"},
    },
)
